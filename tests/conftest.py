import os
from pathlib import Path

import pytest
import torch

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


def load_benchmark(name: str):
    """Import ``benchmarks/<name>.py`` (a script, not a package) as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        f"benchmark_{name}", REPO / "benchmarks" / f"{name}.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
