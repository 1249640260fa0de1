"""Measures of the finding: within-class similarity, diversity, calibration."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def within_class_cosine(features: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over classes of the mean cosine similarity of distinct pairs of one class.

    High values mean the images of a class look alike to the teacher.
    Classes with fewer than two images are skipped.
    """
    per_class = pairwise_cosines(features, labels)
    means = [s.mean() for s in per_class.values() if len(s)]
    if not means:
        raise ValueError("no class has two or more images")
    return float(torch.stack(means).mean())


def pairwise_cosines(features: torch.Tensor, labels: torch.Tensor) -> dict[int, torch.Tensor]:
    """Cosine similarity of every distinct pair within each class (upper triangle, float64)."""
    z = F.normalize(features.double(), dim=1)
    out = {}
    for c in labels.unique().tolist():
        zc = z[labels == c]
        iu = torch.triu_indices(len(zc), len(zc), offset=1)
        out[c] = (zc @ zc.T)[iu[0], iu[1]]
    return out


def expected_calibration_error(logits: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """ECE with equal-width confidence bins: sum_b |B|/n * |acc(B) - conf(B)|."""
    probs = logits.double().softmax(1)
    conf, pred = probs.max(1)
    correct = (pred == labels).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    ece = torch.zeros((), dtype=torch.float64)
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            ece += inside.double().mean() * (correct[inside].mean() - conf[inside].mean()).abs()
    return float(ece)
