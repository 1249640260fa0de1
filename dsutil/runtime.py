"""Device choice and seeding, in one place so every stage does them alike."""
from __future__ import annotations

import os
import random

import numpy as np
import torch


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else the CPU; never assumes CUDA."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} asked for, but this PyTorch sees no CUDA GPU; use --device cpu")
    return torch.device(device)


def loader_workers(requested: int) -> int:
    """DataLoader worker processes: as asked, but never more than the cores this process may use."""
    if requested < 0:
        raise ValueError(f"workers must be 0 or more, got {requested}")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(requested, cores)


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def derive_seed(seed: int, *keys) -> int:
    """A seed for one unit of work, fixed by the run seed and the unit's keys."""
    import hashlib

    h = hashlib.sha256(repr((seed, *keys)).encode()).digest()
    return int.from_bytes(h[:8], "little") & (2**63 - 1)
