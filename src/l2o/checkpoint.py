"""Safe, atomic files for meta-parameters and training state.

Two kinds of file, both safetensors (tensors + a JSON header; nothing is ever
unpickled, so loading a file can never execute code):

* **artifact** - a directory with ``optimizer.safetensors`` (meta-parameters only)
  and ``config.json`` (what rule to build and how).  :func:`l2o.load` reads it.
* **training checkpoint** - one ``.ckpt`` safetensors file with the
  meta-parameters, the meta-optimizer state, RNG states, counters and the
  resolved config, enough to resume exactly.

Writes go to a temporary file in the same directory, are flushed and fsynced,
then renamed over the target (``os.replace`` is atomic on POSIX and Windows), so
a crash leaves either the old file or the new one, never a torn one.  Every file
carries a SHA-256 of its tensor bytes; loading verifies it and names the file
and the problem on any mismatch.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from torch import Tensor

from .errors import CheckpointError, L2OError

FORMAT = "l2o/1"


def ensure_writable_dir(path: str | os.PathLike, argument: str = "--out") -> Path:
    """Create ``path`` if needed and check that files can be written there.

    Raises :class:`L2OError` naming ``argument`` otherwise.  The probe file has a
    unique name, since several processes may share one directory.
    """
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=p, prefix=".l2o-write-test-"):
            pass
    except OSError as e:
        raise L2OError(
            f"{argument}: cannot write to output directory {p}: {e.strerror or e}"
        ) from None
    return p


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file + fsync + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates 0600 files; give the usual umask-derived mode instead.
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _digest(tensors: dict[str, Tensor], meta: str) -> str:
    h = hashlib.sha256(meta.encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


_ST_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def serialize(tensors: dict[str, Tensor], metadata: dict[str, str]) -> bytes:
    """The safetensors bytes of ``tensors``, always the same bytes for the same content.

    ``safetensors.torch.save`` orders the header's metadata as a hash map does, which
    differs between processes; here the header is written with sorted keys, so a
    resumed run's files are byte-identical to an uninterrupted run's.  The layout is
    the standard one (8-byte header length, JSON header padded to 8 bytes, then the
    tensors' bytes in name order), read by any safetensors reader.
    """
    header: dict = {"__metadata__": dict(metadata)}
    chunks, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        if t.dtype not in _ST_DTYPES:
            raise ValueError(f"cannot save tensor {name!r} of dtype {t.dtype}")
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {
            "dtype": _ST_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + b"".join(chunks)


def save_tensors(path: str | os.PathLike, tensors: dict[str, Tensor], meta: dict) -> None:
    """Save tensors plus a JSON-serializable ``meta`` dict, atomically, with a checksum."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta_text = json.dumps(meta)
    header = {"format": FORMAT, "meta": meta_text, "sha256": _digest(tensors, meta_text)}
    atomic_write_bytes(path, serialize(tensors, header))


def load_tensors(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict]:
    """Load and verify a file written by :func:`save_tensors`.

    Raises :class:`CheckpointError` naming the file when it is missing,
    truncated, corrupt, of another format, or fails its checksum.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    data = path.read_bytes()
    try:
        tensors = st_load(data)
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + header_len])
    except (SafetensorError, ValueError, UnicodeDecodeError, OverflowError) as e:
        raise CheckpointError(
            f"{path}: not a readable l2o checkpoint (corrupt or truncated: {e})"
        ) from None
    meta_header = header.get("__metadata__", {}) or {}
    if meta_header.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: unknown checkpoint format {meta_header.get('format')!r}, expected {FORMAT!r}"
        )
    if _digest(tensors, str(meta_header.get("meta", ""))) != meta_header.get("sha256"):
        raise CheckpointError(f"{path}: checksum mismatch, the file is corrupt")
    try:
        meta = json.loads(meta_header["meta"])
    except (KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt metadata ({e})") from None
    return tensors, meta


def load_state_strict(
    module: torch.nn.Module, tensors: dict[str, Tensor], source: str | os.PathLike
) -> None:
    """Load ``tensors`` into ``module`` or fail naming every missing, extra or misshapen entry."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    shapes = [
        f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in tensors and tuple(tensors[k].shape) != tuple(v.shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing {missing}")
    if unexpected:
        problems.append(f"unexpected {unexpected}")
    if shapes:
        problems.append("shape mismatch " + "; ".join(shapes))
    if problems:
        raise CheckpointError(f"{source}: does not match the model: " + ", ".join(problems))
    module.load_state_dict(tensors, strict=True)


# -- the state of a training run's meta-optimizer and scheduler ---------------------------------
def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], list[dict]]:
    """A ``torch.optim`` optimizer's state as ``optim.<param>.<key>`` tensors (on the CPU,
    so checkpoints are device-free) and its parameter groups as JSON-ready dicts."""
    sd = opt.state_dict()
    tensors = {}
    for idx, st in sd["state"].items():
        for key, value in st.items():
            tensors[f"optim.{idx}.{key}"] = (
                value.cpu() if torch.is_tensor(value) else torch.tensor(value)
            )
    groups = [
        {k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()}
        for g in sd["param_groups"]
    ]
    return tensors, groups


def load_optimizer(
    opt: torch.optim.Optimizer,
    tensors: dict[str, Tensor],
    groups: list[dict],
    path,
    device: torch.device | str | None = None,
) -> None:
    """Restore what :func:`optimizer_tensors` wrote; a mismatch is a :class:`CheckpointError`."""
    state: dict = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value if device is None else value.to(device)
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in groups]
    try:
        opt.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: meta-optimizer state does not match: {e}") from None


def json_safe(d: dict) -> dict:
    """The JSON-storable entries of a state dict (a LambdaLR's lambdas are code, not state)."""
    out = {}
    for k, v in d.items():
        try:
            json.dumps(v)
        except (TypeError, ValueError):
            continue
        out[k] = v
    return out
