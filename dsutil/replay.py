"""The crops a label store records and their replay: each relabel epoch's batches (indices, crop boxes, flips,
CutMix/MixUp), drawn from a seed, and the dataset that replays them for training, a whole batch per item."""
from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import Dataset

from .augment import rrc_boxes
from .image_store import ImageSet
from .labels import BatchRecord, LabelStore
from .runtime import derive_seed


def epoch_records(num_images: int, image_hw: tuple[int, int], cfg, epoch: int) -> list[BatchRecord]:
    """The batches of one epoch with all their random draws (no logits yet); fixed by seed and epoch."""
    gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "relabel", epoch))
    perm = torch.randperm(num_images, generator=gen)
    records = []
    for b, index in enumerate(perm.split(cfg.batch_size)):
        n = len(index)
        boxes = rrc_boxes(n, *image_hw, cfg.crop_scale, generator=gen)
        flips = torch.rand(n, generator=gen) < 0.5 if cfg.flip else torch.zeros(n, dtype=torch.bool)
        mix_perm, lam, mix_box = torch.arange(n), 1.0, torch.zeros(4, dtype=torch.long)
        if cfg.mix != "none":
            mix_perm = torch.randperm(n, generator=gen)
            lam = _beta(cfg.mix_alpha, gen)
            if cfg.mix == "cutmix":
                mix_box, lam = _cutmix_box(lam, *image_hw, gen)
        records.append(BatchRecord(epoch, b, index, boxes, flips, mix_perm, lam, mix_box))
    return records


def _beta(alpha: float, gen: torch.Generator) -> float:
    """A Beta(alpha, alpha) draw, seeded from the epoch's generator so it replays."""
    seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    return float(np.random.default_rng(seed).beta(alpha, alpha))


def _cutmix_box(lam: float, height: int, width: int, gen: torch.Generator) -> tuple[torch.Tensor, float]:
    """A box of area about (1 - lam), centred uniformly and clipped; lam is corrected to the clipped area."""
    cut = math.sqrt(1 - lam)
    ch, cw = int(height * cut), int(width * cut)
    cy, cx = (int(v) for v in torch.randint(0, height, (1,), generator=gen).tolist() +
              torch.randint(0, width, (1,), generator=gen).tolist())
    top, bottom = max(cy - ch // 2, 0), min(cy + ch // 2, height)
    left, right = max(cx - cw // 2, 0), min(cx + cw // 2, width)
    box = torch.tensor([top, left, bottom - top, right - left])
    return box, 1 - (bottom - top) * (right - left) / (height * width)


def replay(images, rec: BatchRecord) -> torch.Tensor:
    """The augmented batch of a record, rebuilt with torchvision v2 ops from ``images`` (a tensor of the
    distilled set or an :class:`~dsutil.image_store.ImageSet`, of which only the batch's rows are read)."""
    import torchvision.transforms.v2.functional as TF  # here: importing torchvision costs every command a second

    size = list(images.shape[-2:])
    out = []
    for x, (top, left, h, w), flip in zip(images[rec.index], rec.boxes.tolist(), rec.flips.tolist()):
        x = TF.resized_crop(x, top, left, h, w, size, antialias=True)
        out.append(TF.horizontal_flip(x) if flip else x)
    x = torch.stack(out)
    if rec.mix_lam < 1.0:
        partner = x[rec.mix_perm]
        if rec.mix_box.any():  # CutMix: paste the partner's box
            top, left, h, w = rec.mix_box.tolist()
            x = x.clone()
            x[:, :, top:top + h, left:left + w] = partner[:, :, top:top + h, left:left + w]
        else:  # MixUp
            x = rec.mix_lam * x + (1 - rec.mix_lam) * partner
    return x


class StepBatches(Dataset):
    """Item i is the i-th step's whole batch: the replayed augmented images, the stored logits (None for a
    step that draws its own crops: relabel, online or hard-label steps), the image indices, their hard
    labels, their mix partners' and the mix weight. Whole batches as items let stock DataLoader workers
    read and replay them; a step is ``("stored", epoch, batch)`` (read from the label store at
    ``store_path``) or ``("fresh", epoch, batch)`` (drawn by :func:`epoch_records` with ``fresh_cfg``).
    """

    decodes_files = True  # loaders give it worker processes (runtime.loader_options)

    def __init__(self, images: ImageSet, steps: list[tuple[str, int, int]], fresh_cfg,
                 store_path=None):
        self.images, self.steps, self.fresh_cfg, self.store_path = images, steps, fresh_cfg, store_path
        self.store, self.fresh = None, (None, [])

    def __len__(self) -> int:
        return len(self.steps)

    def __getitem__(self, i):
        kind, epoch, batch = self.steps[i]
        if kind == "stored":
            if self.store is None:  # opened per worker process
                self.store = LabelStore(self.store_path)
            rec = self.store.read(epoch, batch)
        else:  # the draws of a fresh epoch, made once per epoch and worker
            if self.fresh[0] != epoch:
                self.fresh = (epoch, {r.batch: r for r in epoch_records(len(self.images), self.images.shape[-2:],
                                                                         self.fresh_cfg, epoch)})
            rec = self.fresh[1][batch]
        y = self.images.labels[rec.index]
        return replay(self.images, rec), rec.logits, rec.index, y, y[rec.mix_perm], rec.mix_lam
