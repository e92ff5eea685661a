import os
from pathlib import Path

import pytest
import torch

# One intra-op thread by default: the suite's tensors are tiny, so OpenMP barriers cost
# more than they save (on a busy 2-core machine the whole suite ran ~1.8x slower with
# torch's default), and float sums are then reproducible run to run.  Opt out with
# L2O_TEST_THREADS=N (N threads) or L2O_TEST_THREADS=0 (torch's default).
_THREADS = os.environ.get("L2O_TEST_THREADS", "1").strip()
if not _THREADS.isdigit():
    raise pytest.UsageError(f"L2O_TEST_THREADS must be a number >= 0, got {_THREADS!r}")
if int(_THREADS) > 0:
    torch.set_num_threads(int(_THREADS))

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def shared_data_dir() -> Path | None:
    """The development data directory: $L2O_DATA, else ../shared/data beside the repo."""
    env = os.environ.get("L2O_DATA")
    if env and Path(env).is_dir():
        return Path(env)
    return SHARED_DATA if SHARED_DATA.is_dir() else None


def load_benchmark(name: str, folder: str = "benchmarks"):
    """Import ``<folder>/<name>.py`` (a script, not a package) as a module.

    ``folder`` is ``benchmarks`` (the scripts behind docs/results) or ``experiments``
    (the exploration scripts)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        f"{folder.rstrip('s')}_{name}", REPO / folder / f"{name}.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class Killed(Exception):
    """Raised by :func:`killed_then_resumed`'s callback: a run killed mid-way."""


def killed_then_resumed(cfg: dict, out, at: int, **kwargs):
    """Run ``cfg`` in ``out``, kill it when it reaches meta-step ``at``, then resume it to the
    end with a fresh trainer (as a restarted job would); returns the resumed trainer."""
    import pytest

    from l2o.meta import MetaTrainer

    def kill(trainer, row):
        if trainer.meta_step == at:
            raise Killed

    with pytest.raises(Killed):
        MetaTrainer(cfg, out, progress=False, callback=kill, **kwargs).train()
    resumed = MetaTrainer(cfg, out, progress=False, **kwargs)
    resumed.train(resume=True)
    return resumed
