"""The mechanism in two dimensions (notebook 05): synthetic points matched to BN-like statistics, SRe2L's way (each
batch one point per class, global targets) or LPLD's (one batch per class, that class's targets)."""
from __future__ import annotations

import torch

CENTRES = torch.tensor([[0.0, 2.0], [-1.7, -1.0], [1.7, -1.0]])  # three classes, at separation 1


def real_points(sigma: float = 0.5, separation: float = 1.0, n: int = 400, seed: int = 0):
    """``n`` real points per class: Gaussians of width ``sigma`` around the class centres scaled by ``separation``."""
    gen = torch.Generator().manual_seed(seed)
    centres = CENTRES * separation
    y = torch.arange(len(centres)).repeat_interleave(n)
    return centres[y] + sigma * torch.randn(len(y), 2, generator=gen), y, centres


def synthesise(real_x, real_y, centres, grouping: str, k: int = 8, steps: int = 300, r_bn: float = 1.0, seed: int = 0):
    """``k`` points per class from noise, pulled to their class centre (cross-entropy's stand-in) plus ``r_bn`` x
    (|batch mean - target mean| + |batch variance - target variance|) per batch. ``grouping`` "sre2l": k batches
    of one point per class with the global targets; "lpld": one batch per class with the class's targets."""
    classes = len(centres)
    stats = lambda x: (x.mean(0), x.var(0, unbiased=False))  # noqa: E731
    if grouping == "sre2l":
        groups, targets = [torch.arange(classes)] * k, [stats(real_x)] * k
    elif grouping == "lpld":
        groups, targets = [torch.full((k,), c) for c in range(classes)], [stats(real_x[real_y == c]) for c in range(classes)]
    else:
        raise ValueError(f"grouping={grouping!r}: expected sre2l or lpld")
    y = torch.cat(groups)
    gen = torch.Generator().manual_seed(seed)
    x = (0.3 * torch.randn(len(y), 2, generator=gen)).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=0.05)
    for _ in range(steps):
        loss = ((x - centres[y]) ** 2).sum(1).mean()
        for xg, (m, v) in zip(x.split([len(g) for g in groups]), targets):
            loss = loss + r_bn * ((xg.mean(0) - m).norm() + (xg.var(0, unbiased=False) - v).norm())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return x.detach(), y


def within_class_spread(x, y) -> float:
    """Mean over classes and axes of the points' standard deviation within their class."""
    return float(torch.stack([x[y == c].std(0).mean() for c in y.unique()]).mean())
