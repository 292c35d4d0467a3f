"""The device a name means on this host: one line for a name that is not a device or a device this host lacks."""

from __future__ import annotations

import torch

from exegpt.errors import ExeGPTError


def resolve_device(name: str | torch.device | None, label: str = "device") -> torch.device:
    """``name`` ('cpu', 'cuda' or 'cuda:N'; None: ``cuda`` where CUDA is available, else ``cpu``) as a device of
    this host; ``label`` names the option in the error line."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise ExeGPTError(f"{label}={name!r} is not a device; expected cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ExeGPTError(f"{label}={name!r} requested but CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ExeGPTError(f"{label}={name!r} does not exist; this machine has {torch.cuda.device_count()} "
                              f"CUDA device(s)")
    elif dev.type != "cpu":
        raise ExeGPTError(f"{label}={name!r}: expected a cpu or cuda device, not {dev.type}")
    return dev
