"""Distributed meta-training (gloo on 127.0.0.1) and runs killed at any moment."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import load_benchmark
from l2o.checkpoint import load_tensors

RUN_SETS = [
    "train.instances=8",
    "train.horizon=20",
    "train.unroll=5",
    "val.problems=8",
    "val.every=4",
    "train.checkpoint_every=2",
    "rule.layers=8,8",
]


def env_one_thread() -> dict:
    # Bit-exact comparisons need the same summation order in every run: one thread each.
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def meta_train_argv(out: Path, meta_steps: int) -> list[str]:
    argv = ["meta-train", "--task", "quadratic", "--out", str(out), "--resume", "--no-progress"]
    argv += ["--meta-steps", str(meta_steps)]
    for s in RUN_SETS:
        argv += ["--set", s]
    return argv


def test_two_ranks_give_the_meta_gradient_of_one():
    bench = load_benchmark("distributed")
    sets = bench.config_sets(8) + ["train.horizon=10", "train.unroll=5", "rule.layers=8,8"]
    one = bench.run(1, sets, 1)
    two = bench.run(2, sets, 1)
    scale = max(float(g.abs().max()) for g in one["grads"])
    for a, b in zip(one["grads"], two["grads"], strict=True):
        # Same instances, same seeds; only the summation order differs (float32 rounding).
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6 * scale)
    for k, v in one["weights"].items():
        assert torch.allclose(v, two["weights"][k], rtol=1e-5, atol=1e-6), k


def _kill_at_random_moments(argv: list[str], run_dir: Path, kills: int, seed: int) -> None:
    rng = random.Random(seed)
    cmd = [sys.executable, "-m", "l2o", *argv]
    for _ in range(kills):
        proc = subprocess.Popen(cmd, env=env_one_thread(), stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.5, 4.0))  # from before the first checkpoint to mid-run
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        ckpt = run_dir / "last.ckpt"
        if ckpt.exists():
            load_tensors(ckpt)  # never a corrupt checkpoint: writes are atomic
    done = subprocess.run(cmd, env=env_one_thread(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_sigkill_at_five_random_moments_then_resume_equals_an_uninterrupted_run(tmp_path):
    argv_full = meta_train_argv(tmp_path / "full", 30)
    full = subprocess.run(
        [sys.executable, "-m", "l2o", *argv_full], env=env_one_thread(), capture_output=True
    )
    assert full.returncode == 0, full.stderr
    _kill_at_random_moments(meta_train_argv(tmp_path / "killed", 30), tmp_path / "killed", 5, 0)
    for name in ("best", "final"):
        a = (tmp_path / "full" / name / "optimizer.safetensors").read_bytes()
        b = (tmp_path / "killed" / name / "optimizer.safetensors").read_bytes()
        assert a == b, name
    rows = (tmp_path / "killed" / "metrics.csv").read_text().strip().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == list(range(1, 31))


def _torchrun(argv: list[str], restarts: int = 0) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += ["--max-restarts", str(restarts), "-m", "l2o", *argv]
    return subprocess.Popen(
        cmd, env=env_one_thread(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


def _rank_pid(agent: int, rank: int) -> int | None:
    """The pid of the worker of ``rank`` among the launcher's children."""
    kids = subprocess.run(["pgrep", "-P", str(agent)], capture_output=True, text=True).stdout
    for pid in kids.split():
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return int(pid)
    return None


# Slow (two torchrun launches and a kill: about 25 s on a quiet 2-core machine, minutes on
# a loaded one): run it with -m slow.  Before distributed.init_from_env prefixed the store
# per attempt, the restarted attempt failed about 1 time in 4 with a gloo "connection
# refused" (a rank read the dead attempt's address); 9 runs in a row passed after.
@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds workers through /proc")
def test_torchrun_elastic_restart_after_a_rank_is_killed_ends_with_the_same_weights(tmp_path):
    steps = 24
    clean = _torchrun(meta_train_argv(tmp_path / "clean", steps))
    _, err = clean.communicate(timeout=300)
    assert clean.returncode == 0, err
    out = tmp_path / "killed"
    run = _torchrun(meta_train_argv(out, steps), restarts=1)
    deadline = time.time() + 120
    killed = False
    while time.time() < deadline and run.poll() is None:
        rows = (
            (out / "metrics.csv").read_text().count("\n") - 1
            if (out / "metrics.csv").exists()
            else 0
        )
        if rows >= 7:  # past a few checkpoints, well before the end
            pid = _rank_pid(run.pid, 1)
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
                killed = True
                break
        time.sleep(0.05)
    _, err = run.communicate(timeout=300)
    assert killed, "the run ended before a rank could be killed"
    assert run.returncode == 0, err
    a = (tmp_path / "clean" / "final" / "optimizer.safetensors").read_bytes()
    b = (out / "final" / "optimizer.safetensors").read_bytes()
    assert a == b
    rows = (out / "metrics.csv").read_text().strip().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == list(range(1, steps + 1))


def _fewshot_worker(rank: int, world: int, port: int, out: str, result: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world))  # fmt: skip
    torch.set_num_threads(1)
    from l2o.data.episodes import EpisodeSampler
    from l2o.fewshot import MAMLMethod
    from l2o.fewshot.train import EpisodicTrainer
    from test_fewshot import synthetic, tiny_learner

    data = synthetic()
    val = list(EpisodeSampler(data, 5, 1, 2, seed=12).episodes(2))
    torch.manual_seed(0)
    model = MAMLMethod(tiny_learner(), inner_steps=1, first_order=True)
    trainer = EpisodicTrainer(model, EpisodeSampler(data, 5, 1, 2, seed=11), val, out, 8, 4,
                              meta_batch=4, progress=False, clip=0.25)  # fmt: skip
    first: list = []
    step = trainer.opt.step

    def recording_step(*a, **k):
        if not first:  # the first all-reduced (and clipped) meta-gradient
            first.append([p.grad.detach().clone() for p in model.parameters()])
        return step(*a, **k)

    trainer.opt.step = recording_step
    summary = trainer.train()
    if rank == 0:
        torch.save({"grads": first[0], "summary": summary}, result)
    if dist.is_initialized():
        dist.destroy_process_group()


def test_fewshot_training_on_two_ranks_equals_one(tmp_path):
    import torch.multiprocessing as mp

    bench = load_benchmark("distributed")
    res = {}
    for world in (1, 2):
        out, result = tmp_path / f"run{world}", str(tmp_path / f"r{world}.pt")
        args = (world, bench.free_port(), str(out), result)
        mp.start_processes(_fewshot_worker, args=args, nprocs=world, start_method="fork")
        res[world] = torch.load(result, weights_only=True)
    assert res[2]["summary"]["updates"] == res[1]["summary"]["updates"] == 2
    # Compared before Adam: Adam turns float noise in near-zero gradient coordinates into
    # steps of about lr, so weights after training differ where the meta-gradients do not.
    scale = max(float(g.abs().max()) for g in res[1]["grads"])
    for a, b in zip(res[1]["grads"], res[2]["grads"], strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6 * scale)
    # the same checkpoint selection, from the same validation episodes
    assert res[1]["summary"]["best_episode"] == res[2]["summary"]["best_episode"]
    assert (tmp_path / "run2" / "best.safetensors").is_file()
