"""Which torch device a model runs on (shared by the LogLLM and LogLLaMA models and their trainers)."""

from __future__ import annotations

import torch


def pick_device(name: str | None = None) -> torch.device:
    """The torch device to run on: as named, else CUDA when available, else CPU.

    Raises ValueError when `name` asks for CUDA on a machine without it."""
    if name:
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available")
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
