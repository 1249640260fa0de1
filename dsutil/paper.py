"""Reference numbers from the paper, as plain dicts (its tables and official scripts).

Source: Xiao and He, "Are Large-Scale Soft Labels Necessary for Large-Scale
Dataset Distillation?", NeurIPS 2024 (LPLD): the table of ResNet-18 student
results with label storage (ImageNet-1K, Tiny-ImageNet, ImageNet-21K-P), and
the follow-up LPQLD (TPAMI 2026) table of label quantization on ImageNet-1K.
Storage is in the paper's units, written "GB" / "MB"; for ImageNet-1K they
match binary units (GiB) best, see ``notebooks/04_label_storage.ipynb``.

Keys: ``STORAGE[dataset][setting][ipc]`` and ``TOP1[dataset][setting][ipc]``,
with setting ``"full"`` (all soft labels, the previous state of the art) or
``"lpld_40x"`` (LPLD with 97.5% of the label batches pruned at random).
"""
from __future__ import annotations

GB, MB = 2**30, 2**20  # the paper's "GB"/"MB" read as binary units (closest match on ImageNet-1K)

# the relabel settings the paper's storage numbers belong to (the official scripts)
SETTINGS = {
    "imagenet1k": {"classes": 1000, "epochs": 300, "batch_size": {"full": 1024, "lpld_40x": 128},
                   "image_size": 224},
    "tiny-imagenet": {"classes": 200, "epochs": 100, "batch_size": {"full": 64, "lpld_40x": 64}, "image_size": 64},
    "imagenet21k-p": {"classes": 10_450, "epochs": 300, "batch_size": {"full": 1024, "lpld_40x": 128},
                      "image_size": 224},  # epochs/batch not given by the paper: assumed as for ImageNet-1K
}

PRUNE_RATIO_40X = 0.975  # keep 1 of every 40 label batches

STORAGE = {  # bytes, from the paper's "GB"/"MB" values read as GiB/MiB
    "imagenet1k": {
        "full": {10: 5.67 * GB, 20: 11.33 * GB, 50: 28.33 * GB, 100: 56.66 * GB, 200: 113.33 * GB},
        "lpld_40x": {10: 0.14 * GB, 20: 0.29 * GB, 50: 0.71 * GB, 100: 1.43 * GB, 200: 2.85 * GB},
    },
    "tiny-imagenet": {
        "full": {50: 449 * MB, 100: 898 * MB},
        "lpld_40x": {50: 11 * MB, 100: 22 * MB},
    },
    "imagenet21k-p": {
        "full": {10: 643 * GB, 20: 1286 * GB},
        "lpld_40x": {10: 16 * GB, 20: 32 * GB},
    },
}

STORAGE_AS_PRINTED = {  # the paper's numbers and unit strings, unconverted
    "imagenet1k": {"full": {10: "5.67 GB", 20: "11.33 GB", 50: "28.33 GB", 100: "56.66 GB", 200: "113.33 GB"},
                   "lpld_40x": {10: "0.14 GB", 20: "0.29 GB", 50: "0.71 GB", 100: "1.43 GB", 200: "2.85 GB"}},
    "tiny-imagenet": {"full": {50: "449 MB", 100: "898 MB"}, "lpld_40x": {50: "11 MB", 100: "22 MB"}},
    "imagenet21k-p": {"full": {10: "643 GB", 20: "1286 GB"}, "lpld_40x": {10: "16 GB", 20: "32 GB"}},
}

TOP1 = {  # ResNet-18 student, top-1 %
    "imagenet1k": {
        "full": {10: 20.1, 20: 33.6, 50: 46.8, 100: 52.8, 200: 57.0},
        "lpld_40x": {10: 20.2, 20: 33.0, 50: 46.7, 100: 54.0, 200: 59.6},
    },
    "tiny-imagenet": {"full": {50: 41.1, 100: 49.7}, "lpld_40x": {50: 38.4, 100: 46.1}},
    "imagenet21k-p": {"full": {10: 18.5, 20: 20.5}, "lpld_40x": {10: 21.3, 20: 29.4}},
}

# LPQLD (the authors' follow-up, TPAMI 2026), ImageNet-1K, ResNet-18: (storage in GB as printed, top-1 %).
# "xN" is the total reduction against full labels; top-k keeps the k largest logits of every stored label.
LPQLD = {
    10: {"full": (5.67, 20.1), "lpld_x40": (0.14, 20.2), "lpqld_x40_top100": (0.13, 29.6),
         "lpqld_x80_top50": (0.07, 27.3), "lpqld_x200_top10": (0.03, 20.0)},
    50: {"full": (28.33, 46.8), "lpld_x40": (0.71, 46.7), "lpqld_x40_top100": (0.63, 51.3),
         "lpqld_x80_top50": (0.37, 49.6), "lpqld_x200_top10": (0.14, 43.0)},
    200: {"full": (113.33, 57.0), "lpld_x40": (2.85, 59.6), "lpqld_x40_top100": (2.54, 59.9),
          "lpqld_x80_top50": (1.47, 58.8), "lpqld_x200_top10": (0.58, 55.4)},
}

# Other anchors with the same student (top-1 %, ImageNet-1K)
ANCHORS = {"cda_ipc50": 53.5, "rded_ipc10": 42.0, "rded_ipc50": 56.5, "gvbsm_ipc50": 51.8,
           "random_real_relabelled_ipc50": 48.0}

# "about 113 GB of labels for 3 GB of images" (ImageNet-1K, IPC 200; the paper's introduction)
IMAGES_IPC200_IMAGENET1K_GB = 3.0
