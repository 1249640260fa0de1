"""Evaluation of any classifier on a real held-out split: top-1, top-5, calibration."""
from __future__ import annotations

import torch

from .analysis import expected_calibration_error
from .data import ImageData
from .runtime import gather_rows, loader_options, my_rows, world_size


@torch.no_grad()
def predict(model: torch.nn.Module, data: ImageData, split: str = "test", batch_size: int = 500,
            device: torch.device | str = "cpu", workers: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels of a real split, in eval mode, without augmentation (image files are decoded by
    ``workers`` processes; None: see :func:`~dsutil.runtime.loader_options`)."""
    full = getattr(data, split)
    ds = torch.utils.data.Subset(full, range(len(full))[my_rows(len(full))]) if world_size() > 1 else full
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, **loader_options(ds, workers, device))
    model.eval()
    logits, labels = [], []
    for x, y in loader:
        logits.append(model(data.normalize(x.to(device))).float().cpu())
        labels.append(y)
    if not labels:
        raise ValueError(f"the {split} split has {len(full)} images, too few for {world_size()} ranks")
    # under torchrun each rank predicted every world_size-th image; all ranks get them all, in order
    logits, labels = gather_rows(torch.cat(logits), len(full)), gather_rows(torch.cat(labels), len(full))
    return logits, labels


def evaluate(model: torch.nn.Module, data: ImageData, split: str = "test", device="cpu",
             workers: int | None = None) -> dict:
    """Top-1 and top-5 (fractions) and expected calibration error on a real split."""
    logits, labels = predict(model, data, split, device=device, workers=workers)
    k = min(5, logits.shape[1])
    topk = logits.topk(k, 1).indices
    return {"top1": float((topk[:, 0] == labels).float().mean()),
            "top5": float((topk == labels[:, None]).any(1).float().mean()),
            "ece": expected_calibration_error(logits, labels), "n": len(labels)}
