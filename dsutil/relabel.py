"""Relabel: FKD-style soft labels on augmented crops, stored with their replay recipe.

For each epoch the distilled images are shuffled into batches; each image gets
a RandomResizedCrop and a flip, each batch optionally CutMix or MixUp; the
teacher labels the augmented batch. The explicit index list, boxes, flips and
mix parameters are stored with the logits, so training replays exactly what
the teacher saw, whatever the sampler, image count or PyTorch version.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .files import claim, write_json
from .image_store import ImageSet
from .labels import DTYPES, FORMAT_VERSION, PRUNE_POOLS, TOPK_FILLS, BatchRecord, check_prune_ratio, pool_order, write_epoch
from .layout import MARKER, STORE_FILES, STORE_OUTPUTS, TIMING, relabel_store_dir
from .replay import StepBatches, epoch_records
from .runtime import LoaderWait, barrier, derive_seed, is_main, loader_options, my_share, resolve_device
from .settings import check_choices, check_crop_scale, positive, require
from .squeeze import load_squeezed
from .stage import Identity, Marker, input_key

MIXES = ("none", "cutmix", "mixup")


@dataclass
class RelabelConfig:
    epochs: int = 200
    batch_size: int = 50
    crop_scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area fractions of each crop
    flip: bool = True  # horizontal flips of the crops
    mix: str = "none"
    mix_alpha: float = 1.0  # Beta(alpha, alpha) of CutMix/MixUp
    dtype: str = "fp16"  # of the stored logits
    prune_ratio: float = 0.0  # when > 0, only (1 - r) of the batches is ever generated: the prune_pool
    prune_pool: str = "uniform"  # which batches: uniform, first (the official code) or balanced (labels.PRUNE_POOLS)
    topk: int | None = None  # keep only the K largest logits of every label (None: all of them)
    topk_fill: str = "zero"  # the other classes: zero (LPQLD's MR-k), min (MRS-k), mass or probs (MS-k); TOPK_FILLS
    topk_temperature: float = 1.0  # probs: the fixed temperature of the stored top-k probabilities
    teacher_bf16: bool = False  # the teacher labels under bf16 autocast (fast on a GPU; logits stored as dtype)
    seed: int = 0
    CHOICES: ClassVar[dict] = {"mix": MIXES, "dtype": tuple(DTYPES), "prune_pool": PRUNE_POOLS, "topk_fill": TOPK_FILLS}
    # added after runs were made, with the value that gives the behaviour of before (top-k stores were filled with
    # the minimum before MR-k's zero); left out of a stage's key while they hold it
    ADDED: ClassVar[dict] = {"prune_pool": "uniform", "topk": None, "topk_fill": "min", "teacher_bf16": False}

    def __post_init__(self):
        check_choices(self)
        positive("epochs", self.epochs)
        positive("batch_size", self.batch_size)
        check_prune_ratio(self.prune_ratio)
        self.crop_scale = tuple(self.crop_scale)
        check_crop_scale(self.crop_scale)
        positive("mix_alpha", self.mix_alpha)
        require(self.topk is None or self.topk >= 1, "topk", self.topk, "1 or more (or unset: every logit)")
        positive("topk_temperature", self.topk_temperature)

    def identity(self) -> dict:
        """The settings as they bear on the labels: the top-k fill and temperature only where top-k is set."""
        drop = ("topk_fill", "topk_temperature") if self.topk is None else \
            ("topk_temperature",) if self.topk_fill != "probs" else ()
        return {k: v for k, v in asdict(self).items() if k not in drop}


def check_input_size(images: ImageSet, spec: dict, run_dir) -> None:
    """Images the teacher (or a student of its spec) can take: its channels and size, before any work."""
    want = (spec["in_channels"], spec["image_size"], spec["image_size"])
    if tuple(images.shape[-3:]) != want:
        raise ValueError(f"{images.path} holds {'x'.join(map(str, images.shape[-3:]))} images, the teacher of "
                         f"{run_dir} takes {'x'.join(map(str, want))} (channels x height x width); import them at "
                         "the teacher's size, or use a run of their size")


def _relative_to(path: Path, run_dir) -> str:
    """``path`` relative to the run when inside it, so a copied or moved run stays whole."""
    try:
        return str(path.resolve().relative_to(Path(run_dir).resolve()))
    except ValueError:
        return str(path.resolve())


@torch.no_grad()
def relabel(run_dir, images_dir, cfg: RelabelConfig, out: Path | None = None, device: str = "auto",
            progress: bool = True, restart: bool = False, workers: int | None = None) -> Path:
    """Label the distilled images in ``images_dir`` with the run's teacher into a label store.

    ``workers`` DataLoader processes read and replay the batches while the teacher labels (None: as many as
    :func:`~dsutil.runtime.loader_workers` allows); the store is the same bytes whatever their number.
    The store's marker (its key: :func:`relabel_identity`) is written before any epoch file; an interrupted
    relabel of the same key resumes, keeping each epoch file that is whole and holds the batches it should. A
    folder made for another key is refused, or cleared first with ``restart`` (which removes only the store's
    own files). ``manifest.json`` and then the finished marker are last; a finished store of the same key is
    returned as it is, untouched. Times go to ``timing.json``, which nothing reads, so the manifest is the same
    bytes on every run.
    """
    out = Path(out) if out else relabel_store_dir(run_dir, images_dir, cfg)
    with claim(out, "relabel"):
        return _relabel(run_dir, images_dir, cfg, out, device, progress, restart, workers)


def _relabel(run_dir, images_dir, cfg: RelabelConfig, out: Path, device, progress, restart, workers) -> Path:
    dev = resolve_device(device)
    teacher, spec, _, info = load_squeezed(run_dir, dev)
    images = ImageSet(Path(images_dir) / "images.safetensors")
    if len(images.classes) != spec["num_classes"]:
        raise ValueError(f"{images_dir} has {len(images.classes)} classes, the teacher {spec['num_classes']}")
    require(cfg.topk is None or cfg.topk <= spec["num_classes"], "topk", cfg.topk,
            f"at most the number of classes ({spec['num_classes']})")
    check_input_size(images, spec, run_dir)
    ident, marker = relabel_identity(run_dir, images_dir, cfg), Marker(out / MARKER)
    if marker.claim(ident, STORE_FILES, restart, "labels"):
        return out  # finished with these inputs and settings: nothing to do, no byte changes
    marker.start(ident)  # before any epoch file: a killed run's files say what they were made for
    progress = progress and is_main()
    start = time.time()
    n, per_epoch = len(images), math.ceil(len(images) / cfg.batch_size)
    present, todo, counts = _epochs_to_label(out, n, tuple(images.shape[-2:]), cfg)
    barrier()  # every rank has seen which epoch files are whole before any is written
    steps = [("fresh", e, b) for e in my_share(todo) for b in present[e]]  # under torchrun: whole epochs per rank
    waited = _label_epochs(teacher, images, steps, cfg, out, spec["num_classes"], dev, workers, progress)
    barrier()  # every rank's epoch files are written
    present = {e: b for e, b in present.items() if b}
    manifest = {"format_version": FORMAT_VERSION, "classes": images.classes, "teacher": spec,
                "teacher_sha256": ident.input_hashes["teacher.safetensors"],
                "images": _relative_to(images.path, run_dir),
                "images_sha256": ident.input_hashes["images.safetensors"],
                "num_images": n, "epochs": cfg.epochs, "batch_size": cfg.batch_size,
                "batches_per_epoch": per_epoch, "dtype": cfg.dtype, "topk": cfg.topk, "topk_fill": cfg.topk_fill,
                "augmentation": {"crop_scale": cfg.crop_scale, "flip": cfg.flip, "mix": cfg.mix,
                                 "mix_alpha": cfg.mix_alpha},
                "settings": asdict(cfg), "present": present}
    manifest |= {"images_never_labelled": float((counts == 0).double().mean()),  # how evenly the labels cover
                 "labels_per_image_min": int(counts.min()), "labels_per_image_max": int(counts.max())}  # the images
    if is_main():
        write_json(out / TIMING, {"seconds": time.time() - start, "loader_wait_seconds": waited})
        write_json(out / "manifest.json", manifest)
    marker.finish(time.time() - start, STORE_OUTPUTS)  # last: the store is complete
    return out


def _epochs_to_label(out: Path, n: int, hw: tuple[int, int], cfg: RelabelConfig):
    """The batches each epoch stores (all, or those random pruning keeps: known before relabelling, so only they
    are generated), the epochs whose file is not already whole, and each image's number of stored labels."""
    per_epoch = math.ceil(n / cfg.batch_size)
    total = cfg.epochs * per_epoch
    keep = set(range(total))
    if cfg.prune_ratio:
        units = [[(e, b)] for e in range(cfg.epochs) for b in range(per_epoch)]  # generation order: index e * B + b
        order = pool_order(units, cfg.prune_pool, torch.Generator().manual_seed(derive_seed(cfg.seed, "prune")))
        keep = set(order[:max(1, round(total * (1 - cfg.prune_ratio)))])
    present, todo = {}, []
    counts = torch.zeros(n, dtype=torch.long)
    for epoch in range(cfg.epochs):
        records = [r for r in epoch_records(n, hw, cfg, epoch) if epoch * per_epoch + r.batch in keep]
        present[epoch] = [r.batch for r in records]
        for r in records:
            counts[r.index] += 1
        if records and not _holds(out / f"epoch{epoch:05d}.safetensors", records):
            todo.append(epoch)
    return present, todo, counts


def _label_epochs(teacher, images: ImageSet, steps: list, cfg: RelabelConfig, out: Path, num_classes: int, dev,
                  workers, progress: bool) -> float:
    """The teacher's logits of ``steps`` (``("fresh", epoch, batch)``, whole epochs in order), each epoch's file
    written when its last batch is labelled; returns the seconds the loop waited for its loader."""
    n, hw = len(images), tuple(images.shape[-2:])
    batches = StepBatches(images, steps, cfg)
    loader = LoaderWait(DataLoader(batches, batch_size=None, **loader_options(batches, workers, dev)))
    done: list[BatchRecord] = []
    # one epoch's logits in one buffer, made once and refilled every epoch, on the device (moved to the host per
    # epoch: no wait for the device per batch): no long-lived small allocation per batch to fragment the heap
    epoch_logits, row = torch.empty(n, num_classes, device=dev), 0
    with tqdm(loader, desc="relabel", disable=not progress, total=len(steps)) as bar:  # closed on errors too
        for i, (x, *_) in enumerate(bar):
            epoch, batch = steps[i][1:]
            if not done:
                records, row = {r.batch: r for r in epoch_records(n, hw, cfg, epoch)}, 0
            with torch.autocast(dev.type, torch.bfloat16, enabled=cfg.teacher_bf16):
                logits = teacher(x.to(dev, non_blocking=True))
            records[batch].logits = epoch_logits[row:row + len(x)]
            records[batch].logits.copy_(logits)
            row += len(x)
            done.append(records[batch])
            if i + 1 == len(steps) or steps[i + 1][1] != epoch:  # the epoch's last batch: write its file
                write_epoch(out / f"epoch{epoch:05d}.safetensors", done, num_classes, cfg.dtype, cfg.topk,
                            cfg.topk_fill, cfg.topk_temperature)
                done = []
    return loader.seconds


def relabel_identity(run_dir, images_dir, cfg: RelabelConfig) -> Identity:
    """A store's key: its settings and its images' key (the set's stage, which names the teacher); the images'
    and the teacher's files are its inputs."""
    images = Path(images_dir) / "images.safetensors"
    return Identity("relabel", cfg, (input_key(images.parent / MARKER, images),),
                    (images, Path(run_dir) / "teacher.safetensors"))


def _holds(path: Path, records: list[BatchRecord]) -> bool:
    """Whether an epoch file left by an earlier run is whole and holds exactly these batches of these images."""
    if not path.exists():
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor("batch_ids").tolist() == [r.batch for r in records] and \
                torch.equal(f.get_tensor("index").long(), torch.cat([r.index for r in records])) and \
                all(f.get_slice(name).get_shape()[0] == sum(len(r.index) for r in records)
                    for name in f.keys() if name in ("logits", "topk_values", "topk_index", "topk_fill"))
    except Exception:  # truncated, damaged or not safetensors: made again
        return False
