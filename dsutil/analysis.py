"""Measures of the finding: within-class similarity, diversity, calibration."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def within_class_cosine(features: torch.Tensor, labels: torch.Tensor) -> float | None:
    """Mean over classes of the mean cosine similarity of distinct pairs of one class.

    High values mean the images of a class look alike to the teacher.
    Classes with fewer than two images are skipped; with none left (one image per class) there is no pair to
    measure, and the answer is None.
    """
    return streamed_within_class_cosine([(features, labels)])


def streamed_within_class_cosine(batches) -> float | None:
    """:func:`within_class_cosine` over ``(features, labels)`` batches, in memory of one batch and one sum per
    class: with unit vectors z, the distinct pairs of a class of n images sum to (|sum z|^2 - n) / 2, so the mean
    pair cosine is (|sum z|^2 - n) / (n (n - 1)), exact in float64 whatever the number of images."""
    sums: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = {}
    for features, labels in batches:
        z, labels = F.normalize(features.double(), dim=1), torch.as_tensor(labels)
        for c in labels.unique().tolist():
            mine = labels == c
            sums[c] = sums.get(c, 0) + z[mine].sum(0)
            counts[c] = counts.get(c, 0) + int(mine.sum())
    means = [((sums[c] @ sums[c]) - n) / (n * (n - 1)) for c, n in counts.items() if n >= 2]
    return float(torch.stack(means).mean()) if means else None


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
    r = reliability(logits, labels, bins)
    return float((r["count"] / r["count"].sum() * (r["accuracy"] - r["confidence"]).abs()).sum())


def vendi_score(features: torch.Tensor) -> float:
    """Effective number of distinct images: exp of the entropy of the cosine kernel's eigenvalues / n.

    1 when all images are identical, n when they are mutually orthogonal.
    """
    z = F.normalize(features.double(), dim=1)
    eig = torch.linalg.eigvalsh(z @ z.T / len(z)).clamp_min(0)
    eig = eig[eig > 1e-12]
    return float(torch.exp(-(eig * eig.log()).sum()))


def per_class(metric, features: torch.Tensor, labels: torch.Tensor) -> dict[int, float]:
    """A diversity ``metric(features)`` for each class."""
    return {c: metric(features[labels == c]) for c in labels.unique().tolist()}


def feature_variance(features: torch.Tensor) -> float:
    """Total variance (trace of the covariance) of L2-normalised features: spread around the class mean."""
    z = F.normalize(features.double(), dim=1)
    return float(((z - z.mean(0)) ** 2).sum(1).mean())


def reliability(logits: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> dict[str, torch.Tensor]:
    """Per confidence bin: mean confidence, accuracy and count (for a reliability diagram)."""
    probs = logits.double().softmax(1)
    conf, pred = probs.max(1)
    correct = (pred == labels).double()
    idx = torch.clamp(torch.ceil(conf * bins).long() - 1, 0, bins - 1)
    count = torch.bincount(idx, minlength=bins).double()
    safe = count.clamp_min(1)
    return {"confidence": torch.bincount(idx, conf, bins) / safe, "accuracy": torch.bincount(idx, correct, bins) / safe,
            "count": count, "edges": torch.linspace(0, 1, bins + 1, dtype=torch.float64)}


def bn_class_gaps(stats) -> dict[str, torch.Tensor]:
    """How far each class's BN input statistics lie from the global ones, per BN layer.

    ``stats`` is a :class:`dsutil.squeeze.BNStats`. Returns ``mean_gap`` (layers x classes: root mean
    square over channels of (mu_c - mu) / sigma, sigma the global standard deviation), ``var_ratio``
    (layers x classes: mean over channels of var_c / var) and ``between_fraction`` (layers: the share
    of the global variance that the class means explain, sum_c n_c (mu_c - mu)^2 / (n var), averaged
    over channels; the rest is within-class variance, by the law of total variance).
    """
    n_c = stats.class_count.double()
    gaps, ratios, between = [], [], []
    for mu_c, var_c, mu, var in zip(stats.class_mean, stats.class_var, stats.global_mean, stats.global_var):
        mu_c, var_c, mu, var = mu_c.double(), var_c.double(), mu.double(), var.double().clamp_min(1e-12)
        gaps.append((((mu_c - mu) ** 2) / var).mean(1).sqrt())
        ratios.append((var_c / var).mean(1))
        between.append(((n_c[:, None] * (mu_c - mu) ** 2).sum(0) / (n_c.sum() * var)).mean())
    return {"mean_gap": torch.stack(gaps), "var_ratio": torch.stack(ratios), "between_fraction": torch.stack(between)}
