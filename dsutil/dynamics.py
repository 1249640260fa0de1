"""Training dynamics per distilled image, recorded in one student run: the scores of rule-based pruning.

The paper compares random label pruning with rules from data pruning. Each needs what a student did with
an image over training, so every student records, for every view of an image it trained on with a soft
label (the target class is the teacher's argmax for that view):

* EL2N (Paul et al. 2021): mean L2 norm of softmax(student) - softmax(teacher) over the views seen in the
  first ``early`` epochs (or the image's first view, when it came later: a pruned pool is not seen whole early);
* AUM (Pleiss et al. 2020): mean margin, the student's logit of the target class minus its largest other logit;
* forgetting (Toneva et al. 2019): how often a view is misclassified after the image's previous view was
  classified correctly.

A label batch is scored by the mean over its images; see :func:`dsutil.labels.select_batches`.
"""
from __future__ import annotations

import torch

SCORES = ("el2n", "aum", "forgetting")


class Dynamics:
    """Per-image accumulators, updated once per training step, saved and restored as plain tensors. They live on
    the device the student trains on, so a step never waits for the device to copy its logits back."""

    def __init__(self, num_images: int, early_epochs: int, device="cpu"):
        self.early_epochs = early_epochs
        self.state = {name: torch.zeros(num_images, dtype=torch.float64, device=device)
                      for name in ("el2n_sum", "el2n_views", "aum_sum", "views", "forgetting")}
        self.state["last_correct"] = torch.full((num_images,), -1, dtype=torch.int8, device=device)  # -1: not seen

    @torch.no_grad()
    def observe(self, index: torch.Tensor, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                epoch: int) -> None:
        st = self.state
        device = st["views"].device
        index = index.to(device, non_blocking=True)
        s, t = student_logits.detach().double().to(device), teacher_logits.detach().double().to(device)
        target = t.argmax(1)
        correct = s.argmax(1) == target
        other = s.scatter(1, target[:, None], float("-inf")).max(1).values
        margin = s.gather(1, target[:, None])[:, 0] - other
        ones = torch.ones(len(index), dtype=torch.float64, device=device)
        early = (st["el2n_views"][index] == 0) | (epoch < self.early_epochs)
        st["el2n_sum"].index_add_(0, index, (s.softmax(1) - t.softmax(1)).norm(dim=1) * early)
        st["el2n_views"].index_add_(0, index, early.double())
        st["aum_sum"].index_add_(0, index, margin)
        st["views"].index_add_(0, index, ones)
        st["forgetting"].index_add_(0, index, ((st["last_correct"][index] == 1) & ~correct).double())
        st["last_correct"][index] = correct.to(torch.int8)

    def scores(self) -> dict[str, torch.Tensor]:
        """EL2N, AUM and forgetting per image (NaN for an image never seen in the epochs a score uses)."""
        st = {name: t.cpu() for name, t in self.state.items()}
        return {"el2n": st["el2n_sum"] / st["el2n_views"], "aum": st["aum_sum"] / st["views"],
                "forgetting": st["forgetting"].where(st["views"] > 0, torch.tensor(float("nan"), dtype=torch.float64)),
                "views": st["views"]}


def load_scores(path, images_sha256: str | None = None, num_images: int | None = None) -> dict[str, torch.Tensor]:
    """The per-image scores a student saved in ``dynamics.safetensors``; with ``images_sha256`` and
    ``num_images``, they must score those very images (a student of another set is refused)."""
    from .files import load_tensors

    tensors, meta = load_tensors(path)
    missing = set(SCORES) - set(tensors)
    if missing:
        raise ValueError(f"{path} has no {', '.join(sorted(missing))} scores; was it written by a dsutil student?")
    scored = meta.get("images_sha256")
    if images_sha256 and scored and scored != images_sha256:
        raise ValueError(f"{path} scores another image set (sha256 {scored[:12]}...) than the labels' images "
                         f"({images_sha256[:12]}...); give --scores-from a student trained on these images")
    n = len(next(iter(tensors.values())))
    if num_images is not None and n != num_images:
        raise ValueError(f"{path} scores {n} images, the labels' set has {num_images}; give --scores-from a "
                         "student trained on these images")
    return tensors
