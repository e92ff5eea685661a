"""Apply a selection rule fixed in advance to few-shot benchmark runs, then compare the winner.

    python experiments/fewshot_select.py --skip 50 --json select.json "T=15:RUN15" "T=20:RUN20"

Each candidate is ``LABEL:DIR``, where DIR holds a ``benchmarks/fewshot_omniglot.py`` output
(``fewshot_omniglot.json``, one configuration, one meta-learner beside fine-tune and nearest
neighbour) and ``val-350.json`` (or ``--val-name``), an ``l2o fewshot eval --split val`` report
of the meta-learner's checkpoint.  The rule: the candidate with the highest mean accuracy on
the validation episodes after the first ``--skip`` (those chose the checkpoint during
training, so they would favour it) wins; a tie goes to the earlier candidate.  Only the
winner's test score is compared with fine-tune and nearest neighbour; the others' test
scores are listed for the record, never used.

Target (issue 4): the winner is above fine-tune and nearest neighbour and the 95% intervals
do not overlap.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from l2o.checkpoint import atomic_write_text  # noqa: E402
from l2o.fewshot.evaluate import paired_difference, summarize  # noqa: E402

BASELINES = ("finetune", "nearest-neighbour")


def parse_candidate(text: str) -> tuple[str, Path]:
    label, sep, folder = text.partition(":")
    if not sep or not label or not folder:
        raise ValueError(f"candidate {text!r}: expected LABEL:DIR")
    return label, Path(folder)


def read_candidate(label: str, folder: Path, val_name: str, skip: int) -> dict:
    bench, val = folder / "fewshot_omniglot.json", folder / val_name
    for f in (bench, val):
        if not f.is_file():
            raise FileNotFoundError(f"candidate {label}: no {f}")
    configs = json.loads(bench.read_text())["omniglot"]
    if len(configs) != 1:
        raise ValueError(f"candidate {label}: {bench} holds {sorted(configs)}, expected one")
    ((config, results),) = configs.items()
    learners = [k for k in results if k not in BASELINES and k != "paired_differences"]
    if len(learners) != 1 or any(b not in results for b in BASELINES):
        raise ValueError(
            f"candidate {label}: {bench} needs one meta-learner beside {BASELINES}, has {sorted(results)}"
        )
    per_episode = json.loads(val.read_text())["per_episode_accuracy"]
    if len(per_episode) <= skip:
        raise ValueError(
            f"candidate {label}: {val} has {len(per_episode)} episodes, skip is {skip}"
        )
    return {
        "config": config,
        "learner": learners[0],
        "results": results,
        "validation": summarize([a / 100.0 for a in per_episode[skip:]]),
    }


def headline(report: dict) -> dict:
    """The figures a comparison quotes from an evaluation report."""
    return {k: report[k] for k in ("accuracy", "ci95", "episodes")}


def intervals_apart(a: dict, b: dict) -> bool:
    """a's 95% interval lies wholly above b's."""
    return a["accuracy"] - a["ci95"] > b["accuracy"] + b["ci95"]


def select(candidates: dict[str, dict]) -> dict:
    configs = {c["config"] for c in candidates.values()}
    if len(configs) != 1:
        raise ValueError(f"candidates are from different configurations: {sorted(configs)}")
    counts = {k: c["validation"]["episodes"] for k, c in candidates.items()}
    if len(set(counts.values())) != 1:  # means over different episodes do not compare
        raise ValueError(f"candidates have different numbers of validation episodes: {counts}")
    # max() keeps the first of equal scores: a tie goes to the earlier candidate.
    winner = max(candidates, key=lambda k: candidates[k]["validation"]["accuracy"])
    res = candidates[winner]["results"]
    learner = res[candidates[winner]["learner"]]
    report = {
        "config": configs.pop(),
        "validation": {k: c["validation"] for k, c in candidates.items()},
        "chosen": winner,
        "test": {"chosen": headline(learner), **{b: headline(res[b]) for b in BASELINES}},
        "paired": {b: paired_difference(learner, res[b]) for b in BASELINES},
        "not_chosen_test": {
            k: headline(c["results"][c["learner"]]) for k, c in candidates.items() if k != winner
        },
    }
    report["target_met"] = all(intervals_apart(learner, res[b]) for b in BASELINES)
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("candidates", nargs="+", help="LABEL:DIR, in order of preference on a tie")
    ap.add_argument(
        "--skip", type=int, default=50, help="validation episodes left out (default 50)"
    )
    ap.add_argument("--val-name", default="val-350.json")
    ap.add_argument("--json", help="write the report here")
    args = ap.parse_args(argv)
    if args.skip < 0:
        ap.error(f"--skip must be >= 0, got {args.skip}")
    try:
        parsed = [parse_candidate(c) for c in args.candidates]
        labels = [label for label, _ in parsed]
        if len(set(labels)) != len(labels):
            raise ValueError(f"candidate labels repeat: {labels}")
        cands = {label: read_candidate(label, f, args.val_name, args.skip) for label, f in parsed}
        report = select(cands)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report["rule"] = (
        f"highest mean on validation episodes {args.skip + 1}-"
        f"{args.skip + next(iter(report['validation'].values()))['episodes']}; tie -> first listed"
    )
    for k, v in report["validation"].items():
        print(f"validation {k:<8} {v['accuracy']:6.2f} ± {v['ci95']:.2f}")
    t, p = report["test"], report["paired"]
    print(
        f"chosen {report['chosen']}: test {t['chosen']['accuracy']:.2f} ± {t['chosen']['ci95']:.2f}"
    )
    for b in BASELINES:
        print(
            f"  {b:<18} {t[b]['accuracy']:.2f} ± {t[b]['ci95']:.2f}   "
            f"paired {p[b]['difference']:+.2f} ± {p[b]['ci95']:.2f}"
        )
    print(f"target met (above both, intervals apart): {report['target_met']}")
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
