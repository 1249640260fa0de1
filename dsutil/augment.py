"""Batched image augmentation with explicit random draws.

Each op takes its random parameters as tensors, one row per image, so that a
batch can mix images from different groups (each with its own draws) in one
call, and so that draws can be stored and replayed. Crops are done with one
``grid_sample`` over the whole batch instead of a Python loop per image.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def rrc_boxes(n: int, height: int, width: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
              generator: torch.Generator | None = None) -> torch.Tensor:
    """RandomResizedCrop boxes (top, left, h, w) in pixels, n x 4, as torchvision draws them."""
    boxes = torch.empty(n, 4, dtype=torch.long)
    area, log_r = height * width, (math.log(ratio[0]), math.log(ratio[1]))
    for k in range(n):
        for _ in range(10):
            u = torch.rand(4, generator=generator).tolist()
            target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
            aspect = math.exp(log_r[0] + (log_r[1] - log_r[0]) * u[1])
            w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                top, left = int(u[2] * (height - h + 1)), int(u[3] * (width - w + 1))
                boxes[k] = torch.tensor([top, left, h, w])
                break
        else:  # fall back to a centre crop of the clamped aspect ratio
            r = width / height
            w, h = (width, round(width / ratio[0])) if r < ratio[0] else \
                (round(height * ratio[1]), height) if r > ratio[1] else (width, height)
            boxes[k] = torch.tensor([(height - h) // 2, (width - w) // 2, h, w])
    return boxes


def crop_flip(x: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, size: tuple[int, int] | None = None,
              shifts: torch.Tensor | None = None) -> torch.Tensor:
    """Crop each image to its box (top, left, h, w), mirror it if flipped, resize bilinearly; then, with
    ``shifts``, roll image k circularly by shifts[k] = (dy, dx) pixels, as ``roll`` does.

    Outside the image (boxes may reach past the border) pixels are zero. The roll moves the sampling grid,
    not the pixels, so the whole augmentation is one ``grid_sample`` for autograd (cheap to differentiate).
    """
    n, _, height, width = x.shape
    out_h, out_w = size or (height, width)
    b = boxes.to(x.device, x.dtype)
    top, left, h, w = b.unbind(1)
    sign = 1 - 2 * flips.to(x.device, x.dtype)
    theta = torch.zeros(n, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = w / width * sign
    theta[:, 0, 2] = (2 * left + w) / width - 1
    theta[:, 1, 1] = h / height
    theta[:, 1, 2] = (2 * top + h) / height - 1
    grid = F.affine_grid(theta, [n, x.shape[1], out_h, out_w], align_corners=False)
    if shifts is not None:
        grid = roll(grid.permute(0, 3, 1, 2), shifts).permute(0, 2, 3, 1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def roll(x: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Circularly shift image k by shifts[k] = (dy, dx) pixels, like torch.roll per image."""
    n, _, height, width = x.shape
    s = shifts.to(x.device)
    rows = (torch.arange(height, device=x.device)[None] - s[:, :1]) % height
    cols = (torch.arange(width, device=x.device)[None] - s[:, 1:]) % width
    idx = torch.arange(n, device=x.device)[:, None, None]
    return x[idx, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def random_shift_flip(x: torch.Tensor, pad: int, flip: bool, generator: torch.Generator | None = None):
    """Standard training augmentation: translate by up to ``pad`` px (zero fill), optional mirror."""
    n, _, height, width = x.shape
    offsets = torch.randint(-pad, pad + 1, (n, 2), generator=generator)
    boxes = torch.stack([offsets[:, 0], offsets[:, 1], torch.full((n,), height), torch.full((n,), width)], 1)
    flips = torch.rand(n, generator=generator) < 0.5 if flip else torch.zeros(n, dtype=torch.bool)
    return crop_flip(x, boxes, flips)
