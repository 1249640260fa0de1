"""The soft-label store: format, reading, writing, pruning and storage accounting.

A store is a folder with ``manifest.json`` and one safetensors file per
relabel epoch. Each epoch file holds, for the batches of that epoch that were
kept, the teacher's logits and everything needed to replay the augmentation
the teacher saw: image indices of every batch, crop boxes, flips and mix
parameters. Safetensors cannot run code when loaded and can be sliced, so
one batch is read without loading its epoch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .files import file_sha256, read_json
from .settings import one_of

FORMAT_VERSION = 1
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# bytes stored besides the logits: per image index, box (4 x int32), flip, mix partner;
# per batch offset (int64), batch id, mix lambda and mix box (4 x int32)
META_BYTES_PER_IMAGE = 4 + 16 + 1 + 4
META_BYTES_PER_BATCH = 8 + 4 + 4 + 16
HEADER_BYTES_PER_FILE = 584  # safetensors header of one epoch file, no metadata (measured; varies by a few bytes)
HEADER_BYTES_PER_TOPK_FILE = 728  # the same with top-k labels (three tensors in place of the logits)
HEADER_BYTES_PER_TOPK2_FILE = 656  # top-k labels that store no fill value (two tensors)
PRUNE_METRICS = ("random", "order", "entropy-high", "entropy-low", "margin-high", "margin-low",
                 "el2n-high", "el2n-low", "aum-high", "aum-low", "forgetting-high", "forgetting-low")
DYNAMICS_METRICS = tuple(m for m in PRUNE_METRICS if m.split("-")[0] in ("el2n", "aum", "forgetting"))
# what a top-k label gives the other classes: zero probability (LPQLD's MR-k), the label's minimum logit
# (MRS-k), their probability mass at T = 1 spread evenly (mass), or, for labels stored as top-k probabilities at
# a fixed temperature (MS-k), zero probability without renormalising
TOPK_FILLS = ("zero", "min", "mass", "probs")
STORED_FILLS = ("min", "mass")  # the fills that store one value per label
# which stored label batches make the pool at a pruning ratio: a uniform random subset of all (epoch, batch) pairs;
# the first (1 - r) in generation order (the official code); a random pool that gives every image the same number
# of stored labels, within one (whole relabel epochs, then batches of one more epoch)
PRUNE_POOLS = ("uniform", "first", "balanced")


class LabelStoreError(ValueError):
    """A label store that does not fit the images, the student or itself."""


def check_prune_ratio(r: float) -> float:
    if not 0 <= r < 1:
        raise ValueError(f"prune ratio must be in [0, 1), got {r}")
    return r


def storage_bytes(classes: int, ipc: int, epochs: int, batch_size: int = 1024, prune_ratio: float = 0.0,
                  dtype: str = "fp16", topk: int | None = None, metadata: bool = True, topk_fill: str = "min") -> int:
    """Bytes of a label store: E x N x C x bytes x (1 - r), plus replay metadata.

    With ``topk`` a label is its K largest logits and their class indices, plus one fill value for the
    fills that store one (``min``, ``mass``).
    """
    check_prune_ratio(prune_ratio)
    for name, value in (("classes", classes), ("ipc", ipc), ("epochs", epochs), ("batch_size", batch_size)):
        if not 1 <= value <= 10**9:  # far beyond any dataset, and the formula's floats stay exact enough
            raise ValueError(f"{name}={value}: expected a positive integer up to 10^9")
    if topk is not None and not 1 <= topk <= classes:
        raise ValueError(f"topk={topk}: expected 1 to the number of classes ({classes})")
    n = classes * ipc
    per_image = label_bytes(classes, dtype, topk, topk_fill)
    batches = epochs * math.ceil(n / batch_size)
    kept = max(1, round(batches * (1 - prune_ratio)))
    images = kept * n * epochs / batches  # labelled images in the kept batches (on average)
    files = min(epochs, kept)
    header = HEADER_BYTES_PER_FILE if topk is None else \
        HEADER_BYTES_PER_TOPK_FILE if topk_fill in STORED_FILLS else HEADER_BYTES_PER_TOPK2_FILE
    meta = images * META_BYTES_PER_IMAGE + kept * META_BYTES_PER_BATCH + files * header if metadata else 0
    return round(images * per_image + meta)


def index_dtype(classes: int) -> torch.dtype:
    """The smallest integer type that holds every class index."""
    return torch.int16 if classes <= 2**15 else torch.int32


def label_bytes(classes: int, dtype: str, topk: int | None = None, fill: str = "min") -> int:
    """Bytes of one stored label: C logits, or K values + K class indices (+ 1 fill value for min, mass)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    per_value = DTYPES[dtype].itemsize
    if topk is None:
        return classes * per_value
    if not 1 <= topk <= classes:
        raise ValueError(f"topk={topk}: expected 1 to the number of classes ({classes})")
    return topk * (per_value + index_dtype(classes).itemsize) + (per_value if fill in STORED_FILLS else 0)


def topk_compress(logits: torch.Tensor, k: int, fill: str = "min", temperature: float = 1.0) -> dict[str, torch.Tensor]:
    """The K largest logits of every row and their class indices, plus, for ``min`` and ``mass``, the value the
    other classes are rebuilt with (see TOPK_FILLS).

    ``min`` (LPQLD's MRS-k): the row's smallest logit. ``mass``: the value that gives the other C - K classes,
    equally, exactly the probability mass they had at temperature 1. ``zero`` (MR-k) stores nothing more;
    ``probs`` (MS-k) stores the K largest log-probabilities at ``temperature`` in place of the logits.
    """
    if fill not in TOPK_FILLS:
        raise ValueError(f"topk fill must be one of {', '.join(TOPK_FILLS)}, got {fill!r}")
    n, c = logits.shape
    logits = logits.float()
    if fill == "probs":
        logits = (logits / temperature).log_softmax(1)
    values, index = logits.topk(k, 1)
    out = {"topk_values": values, "topk_index": index.to(index_dtype(c))}
    if fill == "min":
        out["topk_fill"] = values[:, -1] if k == c else logits.min(1).values
    elif fill == "mass":
        outside = logits.scatter(1, index, float("-inf"))
        out["topk_fill"] = values[:, -1] if k == c else outside.logsumexp(1) - math.log(c - k)
    return out


def topk_expand(values: torch.Tensor, index: torch.Tensor, fill: torch.Tensor | None, classes: int) -> torch.Tensor:
    """Full rows from :func:`topk_compress`'s parts: the stored values in place, ``fill`` elsewhere, or -inf
    (probability zero) where no fill is stored."""
    rest = torch.full((len(values),), float("-inf")) if fill is None else fill.float()
    out = rest[:, None].expand(len(values), classes).clone()
    return out.scatter(1, index.long(), values.float())


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.2f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024


@dataclass
class BatchRecord:
    """One stored label batch: which images, how they were augmented, and the teacher's logits."""

    epoch: int
    batch: int
    index: torch.Tensor  # B image indices
    boxes: torch.Tensor  # B x 4 (top, left, h, w)
    flips: torch.Tensor  # B bool
    mix_perm: torch.Tensor  # B positions of the mix partner in this batch
    mix_lam: float
    mix_box: torch.Tensor  # 4 (top, left, h, w) of the pasted CutMix box
    logits: torch.Tensor | None = None


def write_epoch(path, records: list[BatchRecord], num_classes: int, dtype: str, topk: int | None = None,
                topk_fill: str = "min", topk_temperature: float = 1.0) -> None:
    """Write the kept batches of one epoch as one safetensors file (atomically); with ``topk``, only
    the parts :func:`topk_compress` keeps of every label."""
    from .files import save_tensors

    sizes = torch.tensor([len(r.index) for r in records], dtype=torch.long)
    logits = torch.cat([r.logits for r in records]).cpu() if records else torch.zeros(0, num_classes)
    labels = {"logits": logits} if topk is None else topk_compress(logits, topk, topk_fill, topk_temperature)
    labels = {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in labels.items()}
    save_tensors(path, {
        "offsets": torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)]),
        "batch_ids": torch.tensor([r.batch for r in records], dtype=torch.int32),
        "index": torch.cat([r.index for r in records]).int(),
        "boxes": torch.cat([r.boxes for r in records]).int(),
        "flips": torch.cat([r.flips for r in records]).to(torch.uint8),
        "mix_perm": torch.cat([r.mix_perm for r in records]).int(),
        "mix_lam": torch.tensor([r.mix_lam for r in records], dtype=torch.float32),
        "mix_box": torch.stack([r.mix_box for r in records]).int(),
    } | labels)


class LabelStore:
    """Read access to a label store folder; opens epoch files lazily, one batch at a time."""

    def __init__(self, path):
        self.path = Path(path)
        if not (self.path / "manifest.json").exists():
            raise FileNotFoundError(f"{self.path / 'manifest.json'} not found: is {self.path} a label store "
                                    "made by `dsutil relabel`?")
        self.manifest = read_json(self.path / "manifest.json")
        if not isinstance(self.manifest, dict) or self.manifest.get("format_version") != FORMAT_VERSION:
            version = self.manifest.get("format_version") if isinstance(self.manifest, dict) else None
            raise LabelStoreError(f"{self.path / 'manifest.json'}: format version {version!r}, this dsutil reads "
                                  f"{FORMAT_VERSION}")
        try:
            m = self.manifest
            self.present = {int(e): [int(b) for b in ids] for e, ids in m["present"].items()}
            self.topk = m.get("topk")  # None: full logits are stored
            self.topk_fill = m.get("topk_fill", "min")  # the fill of stores made before there were others
            ok = (isinstance(m["classes"], list) and len(m["classes"]) >= 1 and all(isinstance(c, str) for c in m["classes"])
                  and m["dtype"] in DTYPES and (self.topk is None or type(self.topk) is int and 1 <= self.topk <= len(m["classes"]))
                  and self.topk_fill in TOPK_FILLS
                  and all(type(m[k]) is int and m[k] >= 1 for k in ("epochs", "batches_per_epoch"))
                  and isinstance(m["images"], str) and isinstance(m["images_sha256"], str))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise LabelStoreError(f"{self.path / 'manifest.json'} is not a label store manifest ({e!r})") from None
        if not ok:
            raise LabelStoreError(f"{self.path / 'manifest.json'} is not a label store manifest: classes, dtype, "
                                  "topk, topk_fill, epochs, batches_per_epoch, images or images_sha256 has the wrong type or value")
        self._handles: dict[int, object] = {}
        self._offsets: dict[int, dict[int, tuple[int, int]]] = {}

    @property
    def num_classes(self) -> int:
        return len(self.manifest["classes"])

    def epoch_path(self, epoch: int) -> Path:
        return self.path / f"epoch{epoch:05d}.safetensors"

    def keys(self) -> list[tuple[int, int]]:
        """Every stored (epoch, batch) pair, in order."""
        return [(e, b) for e in sorted(self.present) for b in self.present[e]]

    def check_images(self, images_path) -> None:
        """Refuse to pair this store with images other than those it was made for."""
        want, got = self.manifest["images_sha256"], file_sha256(images_path)
        if want != got:
            raise LabelStoreError(f"label store {self.path} was made for images with sha256 {want[:12]}..., "
                                  f"but {images_path} has {got[:12]}...; relabel these images")

    def check_files(self) -> None:
        """Every epoch file the manifest names is present, readable and complete."""
        for e in sorted(self.present):
            handle = self._open(e)
            n = handle.get_slice("index").get_shape()[0]
            shapes = {"logits": [n, self.num_classes]} if self.topk is None else \
                {"topk_values": [n, self.topk], "topk_index": [n, self.topk]} | \
                ({"topk_fill": [n]} if self.topk_fill in STORED_FILLS else {})
            shapes |= {"boxes": [n, 4], "flips": [n], "mix_perm": [n]}
            for name, shape in shapes.items():
                if name not in handle.keys() or handle.get_slice(name).get_shape() != shape:
                    raise LabelStoreError(f"{self.epoch_path(e)} has no {name} of shape {shape}, as "
                                          f"{self.path / 'manifest.json'} (topk={self.topk}, {self.num_classes} classes) says "
                                          "it should")

    def _open(self, epoch: int):
        if epoch not in self._handles:
            from safetensors import safe_open

            path = self.epoch_path(epoch)
            if not path.exists():
                raise LabelStoreError(f"{path} is missing from the label store (the manifest lists epoch {epoch})")
            try:
                handle = safe_open(str(path), framework="pt")
                offsets = handle.get_tensor("offsets").tolist()
                ids = handle.get_tensor("batch_ids").tolist()
            except Exception as e:
                raise LabelStoreError(f"{path} is truncated or not a safetensors label file ({e})") from e
            if len(offsets) != len(ids) + 1 or offsets[0] != 0 or any(a > b for a, b in zip(offsets, offsets[1:])) \
                    or set(ids) != set(self.present[epoch]):
                raise LabelStoreError(f"{path} does not hold the batches the manifest lists for epoch {epoch}")
            self._handles[epoch] = handle
            self._offsets[epoch] = {b: (offsets[i], offsets[i + 1]) for i, b in enumerate(ids)}
        return self._handles[epoch]

    def read(self, epoch: int, batch: int) -> BatchRecord:
        """One stored batch, read by slicing its epoch file."""
        h = self._open(epoch)
        if batch not in self._offsets[epoch]:
            raise KeyError(f"batch {batch} of epoch {epoch} is not in {self.path}")
        lo, hi = self._offsets[epoch][batch]
        k = list(self._offsets[epoch]).index(batch)
        try:
            get = lambda name: h.get_slice(name)[lo:hi]  # noqa: E731
            return BatchRecord(epoch, batch, get("index").long(), get("boxes").long(), get("flips").bool(),
                               get("mix_perm").long(), float(h.get_slice("mix_lam")[k:k + 1][0]),
                               h.get_slice("mix_box")[k:k + 1][0].long(), self._logits(get))
        except Exception as e:
            raise LabelStoreError(f"{self.epoch_path(epoch)} could not be read ({e}); is it truncated?") from e

    @property
    def holds_probs(self) -> bool:
        """Whether labels are log-probabilities at a fixed temperature (MS-k), not logits."""
        return self.topk is not None and self.topk_fill == "probs"

    def _logits(self, get) -> torch.Tensor:
        """Full float logits (log-probabilities for MS-k; -inf for classes of probability zero) from a getter
        of stored tensors (a slice of rows, or a whole epoch)."""
        if self.topk is None:
            return get("logits").float()
        fill = get("topk_fill") if self.topk_fill in STORED_FILLS else None
        return topk_expand(get("topk_values"), get("topk_index"), fill, self.num_classes)

    def batch_index(self, epoch: int, batch: int) -> torch.Tensor:
        """The image indices of one stored batch, without reading its labels."""
        h = self._open(epoch)
        lo, hi = self._offsets[epoch][batch]
        return h.get_slice("index")[lo:hi].long()

    def batch_scores(self, metric: str, image_scores: dict[str, torch.Tensor] | None = None
                     ) -> dict[tuple[int, int], float]:
        """Per stored batch: the mean entropy or margin of the teacher's distributions, or the mean over its
        images of a training-dynamics score (``image_scores``, from :mod:`dsutil.dynamics`)."""
        kind = metric.split("-")[0]
        out = {}
        for e in sorted(self.present):
            h = self._open(e)
            if metric in DYNAMICS_METRICS:
                if image_scores is None:
                    raise ValueError(f"pruning by {metric} needs a student's training dynamics (scores_from)")
                s = image_scores[kind].double()[h.get_tensor("index").long()]
                for b, (lo, hi) in self._offsets[e].items():  # the mean over the batch's images that were scored
                    seen = s[lo:hi][~s[lo:hi].isnan()]  # (a short or with-replacement run skips some)
                    if not len(seen):
                        raise ValueError(f"the {kind} scores miss every image of batch {b} of epoch {e} of "
                                         f"{self.path}: were they recorded on these images, by a student that trained "
                                         "on soft labels for more than a few steps?")
                    out[(e, b)] = float(seen.mean())
                continue
            p = self._logits(h.get_tensor).softmax(1)
            if kind == "entropy":
                s = -(p * p.clamp_min(1e-12).log()).sum(1)
            elif kind == "margin":
                top2 = p.topk(2, 1).values
                s = top2[:, 0] - top2[:, 1]
            else:
                raise ValueError(f"no score for metric {metric!r}")
            for b, (lo, hi) in self._offsets[e].items():
                out[(e, b)] = float(s[lo:hi].mean())
        return out

    def kept_bytes(self, kept: list[tuple[int, int]]) -> int:
        """Bytes the kept batches take in this format: labels plus replay metadata."""
        per_image = label_bytes(self.num_classes, self.manifest["dtype"], self.topk, self.topk_fill) + META_BYTES_PER_IMAGE
        total = 0
        for e, b in kept:
            self._open(e)
            lo, hi = self._offsets[e][b]
            total += (hi - lo) * per_image + META_BYTES_PER_BATCH
        return total

    def disk_bytes(self) -> int:
        """The store's bytes on disk: its epoch files and manifest (not timing.json or a runner's stage.json)."""
        return sum(f.stat().st_size for f in [self.path / "manifest.json", *self.path.glob("epoch*.safetensors")])


def pool_order(units: list[list[tuple[int, int]]], pool: str, generator: torch.Generator) -> list[int]:
    """The order in which units of (epoch, batch) pairs, listed in generation order, enter a pruned pool
    (see PRUNE_POOLS); a pool at ratio r keeps the first (1 - r) of them.

    ``balanced`` takes whole relabel epochs in a random order, each one's units shuffled: every epoch's batches
    cover each image once, so the pool's stored-label counts differ by at most one between images.
    """
    one_of("pool", pool, PRUNE_POOLS)
    if pool == "first":
        return list(range(len(units)))
    if pool == "uniform":
        return torch.randperm(len(units), generator=generator).tolist()
    by_epoch: dict[int, list[int]] = {}
    for i, u in enumerate(units):
        by_epoch.setdefault(u[0][0], []).append(i)
    epochs = sorted(by_epoch)
    order = []
    for e in torch.randperm(len(epochs), generator=generator).tolist():
        members = by_epoch[epochs[e]]
        order += [members[j] for j in torch.randperm(len(members), generator=generator).tolist()]
    return order


def coverage(store: LabelStore, keys, num_images: int) -> dict:
    """How many stored labels each image has in the batches ``keys``: the fraction with none, min and max."""
    counts = torch.zeros(num_images, dtype=torch.long)
    for e, b in keys:
        counts += torch.bincount(store.batch_index(e, b), minlength=num_images)
    return {"images_never_labelled": float((counts == 0).double().mean()), "labels_per_image_min": int(counts.min()),
            "labels_per_image_max": int(counts.max())}


def select_batches(store: LabelStore, prune_ratio: float, metric: str = "random", granularity: str = "batch",
                   seed: int = 0, image_scores: dict[str, torch.Tensor] | None = None,
                   pool: str = "uniform") -> list[tuple[int, int]]:
    """The (epoch, batch) pairs kept at ``prune_ratio``: 1 - r of the batches, or of whole epochs;
    ``random`` keeps the ``pool`` (PRUNE_POOLS), ``-high`` the highest-scoring units, ``-low`` the lowest."""
    check_prune_ratio(prune_ratio)
    if metric not in PRUNE_METRICS:
        raise ValueError(f"unknown pruning metric {metric!r}; expected one of {', '.join(PRUNE_METRICS)}")
    if granularity not in ("batch", "epoch"):
        raise ValueError(f"granularity must be 'batch' or 'epoch', got {granularity!r}")
    keys = store.keys()
    if granularity == "epoch":
        units = [[k for k in keys if k[0] == e] for e in sorted(store.present)]
    else:
        units = [[k] for k in keys]
    keep = max(1, round(len(units) * (1 - prune_ratio)))
    if metric == "random":
        order = pool_order(units, pool, torch.Generator().manual_seed(seed))
    elif metric == "order":
        order = list(range(len(units)))
    else:
        scores = store.batch_scores(metric, image_scores)
        unit_score = [sum(scores[k] for k in u) / len(u) for u in units]
        order = sorted(range(len(units)), key=lambda i: unit_score[i], reverse=metric.endswith("-high"))
    return sorted(k for i in order[:keep] for k in units[i])
