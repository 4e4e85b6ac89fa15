"""Device names from the command line or a config: parsed once, with errors that say what to use."""

from __future__ import annotations

import torch

from shared.errors import UserError


class DeviceError(UserError, ValueError):
    pass


def parse_device(spec: str, what: str = "device") -> torch.device | None:
    """torch.device for `spec`, or None for "auto". Checks the spelling only, not the hardware."""
    if spec == "auto":
        return None
    try:
        return torch.device(spec)
    except (RuntimeError, TypeError):
        raise DeviceError(f"{what} {spec!r} is not a device; use auto, cpu, cuda or cuda:N") from None


def resolve_device(spec: str, what: str = "device") -> torch.device:
    """The device to run on: "auto" is CUDA when present, else the CPU. A CUDA device this machine
    does not have is an error naming `what` (e.g. "--device")."""
    device = parse_device(spec, what)
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"{what} {spec!r}: this machine has no CUDA device (or torch {torch.__version__} "
                              "was built without CUDA); use cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"{what} {spec!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"{what} {spec!r}: MPS is not available on this machine; use cpu or auto")
    return device
