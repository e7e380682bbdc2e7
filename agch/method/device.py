"""Where and in what precision a run computes: the device a `--device` names, and the precision a run of a config
has there (part of what makes two runs comparable: runs are reused only at the same precision)."""

from __future__ import annotations

from agch.config import Config
from agch.errors import UserError


def precision_of(config: Config, device: str) -> str:
    """The precision a run of `config` on `device` ('auto', 'cpu', 'cuda[:N]') computes in: 'bf16' (config.bf16 on
    CUDA) or 'fp32' (bf16 is ignored on CPU). Tagged agch.precision; runs are reused only at the same precision."""
    import torch

    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    return "bf16" if config.bf16 and cuda else "fp32"


def resolve_device(device: str) -> "torch.device":  # noqa: F821
    """'auto' → CUDA when present, else CPU; 'cuda' without a GPU is a user error."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device '{device}' asked for, but torch sees no CUDA GPU; use --device cpu or auto")
    if device != "cpu" and not device.startswith("cuda"):
        raise UserError(f"unknown device '{device}'; allowed: auto, cpu, cuda, cuda:N")
    return torch.device(device)
