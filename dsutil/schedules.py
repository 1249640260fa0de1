"""Learning-rate schedules, one for the teacher's and the student's training loops alike."""
from __future__ import annotations

import torch


def lr_schedule(opt, steps: int, warmup_steps: int):
    """Cosine decay over ``steps`` per-step updates; with ``warmup_steps``, first a linear ramp from 1% of the
    rate (the official Tiny-ImageNet student warms up 5 epochs this way), then cosine over the rest."""
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps - warmup_steps if warmup_steps else steps)
    if not warmup_steps:
        return cosine
    ramp = torch.optim.lr_scheduler.LinearLR(opt, 0.01, 1.0, warmup_steps)
    return torch.optim.lr_scheduler.SequentialLR(opt, [ramp, cosine], [warmup_steps])
