"""Which device a command runs on: one parser and one availability check for every command.

``cpu``, ``cuda`` or ``cuda:N``; a device this machine does not have is a clear
error naming the argument, never a traceback from deep inside PyTorch.
"""

from __future__ import annotations

import torch

from .errors import L2OError

FORMS = "cpu, cuda or cuda:N"


def check_form(text: str, what: str = "device") -> str:
    """``text`` if it spells ``cpu``, ``cuda`` or ``cuda:N``, else an error naming ``what``."""
    ok = text == "cpu" or text == "cuda" or (text.startswith("cuda:") and text[5:].isdigit())
    if not ok:
        raise L2OError(f"{what} must be {FORMS}, got {text!r}")
    return text


def resolve_device(device: str | torch.device, what: str = "--device") -> torch.device:
    """``device`` as a torch.device, with a clear error when it does not exist here."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise L2OError(
            f"{what}: {device!r} is not a device (expected cpu, cuda or cuda:N)"
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise L2OError(f"{what}: {device!r} asked for, but CUDA is not available here")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise L2OError(
                f"{what}: {device!r} asked for, but only {torch.cuda.device_count()} GPU(s) exist"
            )
    return dev
