"""The per-step metrics CSV of a training run (meta-training and few-shot training).

A killed run may have appended rows after its last checkpoint; on resume
:func:`truncate` drops them, since the resumed run replays those steps.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path


def start(path: Path, fields: Sequence[str]) -> None:
    """A fresh CSV holding only the header."""
    path.write_text(",".join(fields) + "\n")


def append(path: Path, fields: Sequence[str], row: dict, extrasaction: str = "ignore") -> None:
    with open(path, "a", newline="") as f:
        # one line ending for header and rows (csv defaults to \r\n)
        csv.DictWriter(f, fields, extrasaction=extrasaction, lineterminator="\n").writerow(row)


def truncate(path: Path, fields: Sequence[str], step_key: str, last_step: int) -> None:
    """Keep the rows whose ``step_key`` is at most ``last_step`` (the checkpoint's step)."""
    rows = []
    if path.exists():
        with open(path, newline="") as f:
            rows = [
                r for r in csv.DictReader(f) if r.get(step_key) and int(r[step_key]) <= last_step
            ]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fields, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
