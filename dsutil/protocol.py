"""The field's evaluation protocol beside every result: hard-label baselines, DD-Ranking's label-robust scores and
the total storage of a distilled set.

With abundant soft labels a random real subset can match a strong method ("Hard Truths about Soft Labels", CVPR
2026), so a method's number means little without the same images trained on one-hot labels, random real images
under the same labels, and the whole real training set. DD-Ranking (Li et al., arXiv 2505.13300) folds these into
its hard label recovery (HLR), improvement over random (IOR) and label-robust score (LRS): docs/protocol.md.
"""
from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

HARD = 1.0  # a hard-label student: every epoch on one-hot labels of fresh crops (StudentConfig.hard_epochs)


def hard_label_config(scfg, seed: int):
    """The hard-label baseline of a student setting: the same images, epochs, augmentation, optimiser and seed,
    one-hot labels in place of the stored ones (none read, so no pruning ratio)."""
    return replace(scfg, hard_epochs=HARD, hard_weight=0.0, prune_ratio=0.0, metric="random", seed=seed,
                   pool="uniform", draw="cycle", granularity="batch")  # these choose stored batches: none is read


def full_real_reference(squeezed: dict, student) -> dict:
    """The accuracy of the whole real training set with hard labels: the teacher's test top-1, which is that number
    when the teacher has the student's architecture and recipe; ``same_architecture`` and ``recipe`` say how far
    it is from the students' (DD-Ranking trains the student's own recipe on the full set; dsutil reuses the teacher,
    whose recipe is its own)."""
    spec, settings = squeezed["teacher"], squeezed["settings"]
    same = all(spec.get(k) == getattr(student, k) for k in ("arch", "width", "depth"))
    if squeezed.get("teacher_checkpoint") or settings.get("pretrained"):
        recipe = "an imported or pretrained teacher's (its recipe is not recorded here)"
    else:
        recipe = (f"the teacher's ({settings['optimizer']}, lr {settings['lr']:g}, epochs {settings['epochs']} of "
                  f"the whole training set, {settings.get('augment', 'shift')} augmentation), not the students' "
                  f"({student.optimizer}, lr {student.lr:g})")
    return {"test_top1": squeezed["test_top1"], "from": "teacher", "same_architecture": same, "recipe": recipe}


def label_robust_scores(full_real_hard: float, syn_hard: float, syn: float, random_real: float,
                        weight: float = 0.5) -> dict:
    """DD-Ranking's scores of one distilled set under one label setting, accuracies as fractions in [0, 1]:

    HLR = full_real_hard - syn_hard (how far the images alone are from the whole real set; lower is better),
    IOR = syn - random_real (what the images add over random real images under the same labels; higher is
    better), LRS = (e^a - e^-1) / (e - e^-1) with a = w IOR - (1 - w) HLR: in [0, 1], as its docs say, because
    fractions keep a in [-1, 1] (its code feeds percents, which leaves the range unbounded; docs/protocol.md).
    """
    hlr, ior = full_real_hard - syn_hard, syn - random_real
    a = weight * ior - (1 - weight) * hlr
    return {"hlr": hlr, "ior": ior, "lrs": (math.exp(a) - math.exp(-1)) / (math.e - math.exp(-1))}


def add_label_robust_scores(methods: dict, full_real: dict | None) -> None:
    """``scores`` (HLR, IOR, LRS) in each student entry of a run summary's ``methods``, from the means over seeds of
    the students' top-1: the method's own hard-label student, the ``real`` set's student of the same ratio and
    metric (random real images with the same labels), and ``full_real``. None where one of them is missing."""
    random_real = {(s["prune_ratio"], s["metric"]): s["test_top1"] for s in methods.get("real", {}).get("students", [])}
    for m in methods.values():
        for s in m["students"]:
            rdm = random_real.get((s["prune_ratio"], s["metric"]))
            s["scores"] = None if full_real is None or m["hard_label"] is None or rdm is None else \
                label_robust_scores(full_real["test_top1"], m["hard_label"]["test_top1"], s["test_top1"], rdm)


def image_bytes(images_file) -> int:
    """A set's images as stored (its safetensors file: pixels, labels and header)."""
    return Path(images_file).stat().st_size


def pixel_bytes(classes: int, ipc: int, image_size: int, channels: int = 3, pixels: str = "uint8") -> int:
    """The pixels of a set of ``classes`` x ``ipc`` images as an image store keeps them (uint8, or float32 as the CPU
    presets do); its labels and header add a few bytes per image."""
    from .image_store import ENCODINGS

    return classes * ipc * channels * image_size * image_size * ENCODINGS[pixels][2].itemsize
