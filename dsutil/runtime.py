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


def loader_workers(requested: int | None = None) -> int:
    """DataLoader worker processes: as asked, but never more than the cores this process may use; None
    leaves one core to the main process (at most 8 workers; 0 on a single core)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if requested is None:
        return min(8, cores - 1)
    if requested < 0:
        raise ValueError(f"workers must be 0 or more, got {requested}")
    return min(requested, cores)


def loader_options(dataset, workers: int | None, device, epochs: int = 1) -> dict:
    """DataLoader keywords: worker processes for datasets that decode files (``workers=None``: as
    :func:`loader_workers` allows; in-memory datasets get none, they have nothing to decode), pinned memory
    when batches go to a GPU, and workers kept alive across epochs."""
    if workers is None and not getattr(dataset, "decodes_files", False):
        workers = 0
    workers = loader_workers(workers)
    return {"num_workers": workers, "pin_memory": torch.device(device).type == "cuda",
            "persistent_workers": workers > 0 and epochs > 1}


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
