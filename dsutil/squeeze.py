"""Squeeze: train the teacher, then measure global and class-wise BN statistics.

The class-wise statistics are what LPLD's recover stage matches. Two settings choose them: the views the
teacher sees (``plain`` training images, or the official code's ``augmented`` RandomResizedCrop + flip
views) and the estimator (``exact`` float64 sums over one pass in eval mode, or the official code's
per-class momentum ``running`` averages, updated only in batches that hold the class). docs/fidelity.md
gives what each choice does to the results.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from .augment import crop_flip, random_shift_flip, rrc_boxes
from .data import ImageData
from .evaluate import evaluate
from .files import (
    claim,
    file_sha256,
    load_model,
    load_tensors,
    read_json,
    save_model,
    save_tensors,
    write_json,
    write_metrics,
)
from .layout import SQUEEZE_MARKER, SQUEEZE_OUTPUTS, made_from_teacher
from .models import ARCHS, build_model
from .runtime import (
    barrier,
    derive_seed,
    is_main,
    loader_options,
    my_rows,
    rank,
    resolve_device,
    seed_everything,
    sum_over_ranks,
    world_size,
)
from .schedules import lr_schedule
from .settings import check_choices, non_negative, positive, require
from .stage import Identity, Marker

BN_VIEWS = ("plain", "augmented")
BN_ESTIMATORS = ("exact", "running")


@dataclass
class TeacherConfig:
    arch: str = "convnet"
    width: int = 64
    depth: int = 3
    epochs: int = 8
    batch_size: int = 128
    optimizer: str = "sgd"  # or adamw
    lr: float = 0.05
    weight_decay: float = 5e-4
    shift: int = 2  # translation augmentation, pixels (augment: shift)
    augment: str = "shift"  # shift (+ flip), or rrc: RandomResizedCrop 0.08-1 + flip, as the official teachers
    lr_warmup_epochs: int | None = None  # None: one-cycle (15% warm-up, cosine); N: linear warm-up N epochs, cosine
    seed: int = 0
    pretrained: bool = False  # start from cached torchvision weights
    bn_views: str = "plain"  # what the BN statistics are measured on: plain or augmented (official) views
    bn_estimator: str = "exact"  # exact float64 sums, or running (official: momentum averages per class)
    bn_momentum: float = 0.1  # of the running estimator, as BatchNorm's default
    bn_batch_size: int = 256  # images per pass; the running estimator updates once per batch (official: 256)
    CHOICES: ClassVar[dict] = {"arch": ARCHS, "optimizer": ("sgd", "adamw"), "augment": ("shift", "rrc"),
                               "bn_views": BN_VIEWS, "bn_estimator": BN_ESTIMATORS}
    # added after runs were made, with the value that gives the behaviour of before; left out of a stage's key while
    # they hold it
    ADDED: ClassVar[dict] = {"augment": "shift", "lr_warmup_epochs": None, "bn_views": "plain", "bn_estimator": "exact",
                             "bn_momentum": 0.1, "bn_batch_size": 256}

    def __post_init__(self):
        check_choices(self)
        require(self.lr_warmup_epochs is None or 0 <= self.lr_warmup_epochs < max(1, self.epochs), "lr_warmup_epochs",
                self.lr_warmup_epochs, "fewer than the epochs (or null: the one-cycle schedule)")
        require(0 < self.bn_momentum <= 1, "bn_momentum", self.bn_momentum, "a fraction in (0, 1]")
        positive("bn_batch_size", self.bn_batch_size)
        for name in ("width", "depth", "batch_size"):
            positive(name, getattr(self, name))
        for name in ("epochs", "weight_decay", "shift"):
            non_negative(name, getattr(self, name))
        positive("lr", self.lr)


@dataclass
class BNStats:
    """Per-channel input mean and biased variance of every BN layer, globally and per class."""

    layers: list[str]
    classes: list[str]
    class_count: torch.Tensor  # images per class, C
    class_mean: list[torch.Tensor]  # per layer, C x channels, float64
    class_var: list[torch.Tensor]
    global_mean: list[torch.Tensor] = field(default_factory=list)  # per layer, channels
    global_var: list[torch.Tensor] = field(default_factory=list)

    def save(self, path) -> None:
        t = {"class_count": self.class_count}
        for i in range(len(self.layers)):
            t |= {f"{i}.class_mean": self.class_mean[i], f"{i}.class_var": self.class_var[i],
                  f"{i}.global_mean": self.global_mean[i], f"{i}.global_var": self.global_var[i]}
        save_tensors(path, t, {"layers": self.layers, "classes": self.classes})

    @classmethod
    def load(cls, path) -> "BNStats":
        t, meta = load_tensors(path)
        n = len(meta["layers"])
        get = lambda key: [t[f"{i}.{key}"] for i in range(n)]  # noqa: E731
        return cls(meta["layers"], meta["classes"], t["class_count"], get("class_mean"), get("class_var"),
                   get("global_mean"), get("global_var"))


def bn_layers(model: nn.Module) -> list[tuple[str, nn.BatchNorm2d]]:
    """Every BatchNorm2d of the model, in forward-definition order."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no BatchNorm2d layer: BN statistics need a BN model "
                         "(use convnet or a torchvision ResNet/MobileNet)")
    return layers


class _ExactBN:
    """One BN layer's float64 sums of every image's inputs per class, and of their squares: exact statistics."""

    def __init__(self, num_classes: int, momentum: float):
        self.num_classes, self.sum, self.square = num_classes, None, None

    def add(self, x: torch.Tensor, y: torch.Tensor, pixels: int) -> None:
        if self.sum is None:
            self.sum = torch.zeros(self.num_classes, x.shape[1], dtype=torch.float64, device=x.device)
            self.square = torch.zeros_like(self.sum)
        self.sum.index_add_(0, y, x.sum((2, 3)))
        self.square.index_add_(0, y, (x * x).sum((2, 3)))

    def result(self, count: torch.Tensor, pixels: int) -> tuple[torch.Tensor, ...]:
        """Class mean and variance, global mean and variance (biased, over every pixel)."""
        n_pix = count[:, None] * pixels
        mean = self.sum / n_pix
        g_mean = self.sum.sum(0) / n_pix.sum()
        return (mean, (self.square / n_pix - mean * mean).clamp_min(0), g_mean,
                (self.square.sum(0) / n_pix.sum() - g_mean * g_mean).clamp_min(0))


class _RunningBN(_ExactBN):
    """One BN layer's running estimates, the official rule: from mean 0 and variance 1, each batch moves a
    class's estimate by ``momentum`` towards its images' biased statistics in the batch, the global one
    towards the batch's."""

    def __init__(self, num_classes: int, momentum: float):
        super().__init__(num_classes, momentum)
        self.momentum, self.estimates = momentum, None  # class mean, class var, global mean, global var

    def add(self, x: torch.Tensor, y: torch.Tensor, pixels: int) -> None:
        self.sum = self.square = None  # this batch's sums alone
        super().add(x, y, pixels)
        s, sq, m = self.sum, self.square, self.momentum
        n = torch.bincount(y, minlength=self.num_classes).double()[:, None] * pixels
        present = n[:, 0] > 0
        mean = s[present] / n[present]
        if self.estimates is None:
            channels = x.shape[1]
            self.estimates = [torch.zeros_like(s), torch.ones_like(s),
                              torch.zeros(channels, dtype=torch.float64, device=x.device),
                              torch.ones(channels, dtype=torch.float64, device=x.device)]
        r = self.estimates
        g_mean = s.sum(0) / n.sum()
        for est, value in ((0, mean), (1, sq[present] / n[present] - mean * mean)):
            r[est][present] = (1 - m) * r[est][present] + m * value
        r[2] = (1 - m) * r[2] + m * g_mean
        r[3] = (1 - m) * r[3] + m * (sq.sum(0) / n.sum() - g_mean * g_mean)

    def result(self, count: torch.Tensor, pixels: int) -> tuple[torch.Tensor, ...]:
        return tuple(self.estimates)


@torch.no_grad()
def bn_statistics(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], classes: list[str],
                  device: torch.device | str = "cpu", estimator: str = "exact", momentum: float = 0.1) -> BNStats:
    """BN input statistics from one pass over ``(normalised images, labels)`` batches: ``exact`` (float64
    sums over every image; under torchrun each rank's batches are its share) or ``running`` (the official
    rule, :class:`_RunningBN`)."""
    layers = bn_layers(model)
    num_classes = len(classes)
    per_layer = [(_ExactBN if estimator == "exact" else _RunningBN)(num_classes, momentum) for _ in layers]
    count = torch.zeros(num_classes, dtype=torch.float64, device=device)
    pixels: dict[int, int] = {}
    labels = {}

    def hook(i):
        def record(module, inputs, output):
            x = inputs[0].double()
            if pixels.setdefault(i, x.shape[2] * x.shape[3]) != x.shape[2] * x.shape[3]:
                raise ValueError(f"BN layer {layers[i][0]} saw inputs of varying size; resize the images")
            per_layer[i].add(x, labels["y"], pixels[i])
        return record

    handles = [m.register_forward_hook(hook(i)) for i, (_, m) in enumerate(layers)]
    was_training = model.training
    model.eval()
    try:
        for x, y in batches:
            y = y.to(device)
            if y.numel() and (y.min() < 0 or y.max() >= num_classes):
                raise ValueError(f"labels outside 0..{num_classes - 1}")
            labels["y"] = y
            count.index_add_(0, y, torch.ones_like(y, dtype=torch.float64))
            model(x.to(device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if estimator == "exact":  # under torchrun each rank saw a share of the images
        sum_over_ranks([count, *(t for layer in per_layer for t in (layer.sum, layer.square))])
    if count.sum() == 0:
        raise ValueError("no images were given to bn_statistics")
    stats = BNStats([n for n, _ in layers], list(classes), count.cpu(), [], [])
    for i, layer in enumerate(per_layer):
        for target, value in zip((stats.class_mean, stats.class_var, stats.global_mean, stats.global_var),
                                 layer.result(count, pixels[i])):
            target.append(value.cpu())
    return stats


def normalised_batches(data: ImageData, batch_size: int = 256, split: str = "train", workers: int | None = None,
                       device="cpu", shard: bool = False, shuffle_seed: int | None = None,
                       augment_seed: int | None = None):
    """``(normalised float images, labels)`` over a split for statistics: in order, or shuffled by
    ``shuffle_seed``; files are decoded by ``workers`` processes (None: see :func:`~dsutil.runtime.loader_options`).
    With ``shard``, this rank's share of the images only (every world_size-th, from its rank). With
    ``augment_seed``, each image is a RandomResizedCrop (scale 0.08-1) back to its size, flipped at random
    where flips keep the class: the views the official code measures class statistics on."""
    ds = getattr(data, split)
    if shard and world_size() > 1:
        if len(ds) < world_size():
            raise ValueError(f"{len(ds)} images cannot be shared by {world_size()} ranks")
        ds = torch.utils.data.Subset(ds, range(rank(), len(ds), world_size()))
    order = {} if shuffle_seed is None else {"shuffle": True, "generator": torch.Generator().manual_seed(shuffle_seed)}
    views = None if augment_seed is None else torch.Generator().manual_seed(augment_seed)
    for x, y in torch.utils.data.DataLoader(ds, batch_size=batch_size, **order, **loader_options(ds, workers, device)):
        if views is not None:
            n, _, height, width = x.shape
            boxes = rrc_boxes(n, height, width, (0.08, 1.0), generator=views)
            flips = torch.rand(n, generator=views) < 0.5 if data.flip else torch.zeros(n, dtype=torch.bool)
            x = crop_flip(x.float() / 255 if x.dtype == torch.uint8 else x, boxes, flips)
        yield data.normalize(x.to(device, non_blocking=True)), y


def train_teacher(data: ImageData, cfg: TeacherConfig, device="cpu", progress: bool = True,
                  metrics_path: Path | None = None, workers: int | None = None) -> nn.Module:
    """Train a classifier on the real training split with a cosine schedule; ``metrics_path`` gets one JSON
    line per epoch (mean loss, accuracy on the augmented training batches, learning rate, seconds).

    Under torchrun every rank draws the same batches and augmentations (one seed) and trains on its rows of
    each, DistributedDataParallel averaging the gradients: the step of one process with the whole batch, except
    that on the CPU BatchNorm normalises each rank's rows by their own statistics (SyncBatchNorm on GPUs)."""
    gen = seed_everything(cfg.seed)
    c, h, _ = data.shape
    model = build_model(cfg.arch, data.num_classes, c, h, width=cfg.width, depth=cfg.depth,
                        pretrained=cfg.pretrained).to(device)
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay, nesterov=True)
    elif cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), cfg.lr, weight_decay=cfg.weight_decay)
    else:
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}; expected sgd or adamw")
    if cfg.epochs == 0:  # a pretrained teacher used as it is
        return model.eval()
    net = model  # what the steps run: under torchrun, DDP around the teacher
    if world_size() > 1:
        cuda = torch.device(device).type == "cuda"
        if cuda:
            model = net = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device] if cuda else None)
    loader = torch.utils.data.DataLoader(data.train, batch_size=cfg.batch_size, shuffle=True, generator=gen,
                                         drop_last=len(data.train) > cfg.batch_size,
                                         **loader_options(data.train, workers, device, cfg.epochs))
    if cfg.lr_warmup_epochs is None:
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=cfg.epochs * len(loader),
                                                    pct_start=0.15, anneal_strategy="cos")
    else:
        sched = lr_schedule(opt, cfg.epochs * len(loader), cfg.lr_warmup_epochs * len(loader))
    model.train()
    bar = tqdm(total=cfg.epochs * len(loader), desc="teacher", unit="step", disable=not progress)
    history, start = [], time.time()
    try:  # closed on errors too, so an error's line starts a line of its own
        for epoch in range(cfg.epochs):
            total, began = torch.zeros(3, device=device), time.time()  # loss sum, correct, images
            for x, y in loader:
                x = x.float() / 255
                if cfg.augment == "shift":
                    x = random_shift_flip(x, cfg.shift, data.flip, gen)
                else:
                    flips = torch.rand(len(x), generator=gen) < 0.5 if data.flip else torch.zeros(len(x), dtype=torch.bool)
                    x = crop_flip(x, rrc_boxes(len(x), *x.shape[-2:], (0.08, 1.0), generator=gen), flips)
                mine = my_rows(len(y))  # this rank's rows of the batch (all of them in one process)
                x, y = x[mine].to(device), y[mine].to(device)
                logits = net(data.normalize(x))
                loss = nn.functional.cross_entropy(logits, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += torch.stack([loss.detach() * len(y), (logits.argmax(1) == y).sum(), torch.tensor(len(y), device=device)])
                bar.update()
            sum_over_ranks([total])
            loss_sum, correct, n = total.tolist()
            history.append({"epoch": epoch, "loss": loss_sum / n, "train_top1": correct / n, "lr": sched.get_last_lr()[0],
                            "seconds": time.time() - start, "epoch_seconds": time.time() - began})
            bar.set_postfix(epoch=epoch, loss=f"{loss_sum / n:.3f}")
            if metrics_path is not None and is_main():
                write_metrics(metrics_path, history)
    finally:
        bar.close()
    return model.eval()


def measure_bn_statistics(model: nn.Module, data: ImageData, cfg: TeacherConfig, device, workers: int | None = None,
                          progress: bool = True) -> BNStats:
    """The BN statistics ``cfg`` names (views and estimator). The running estimator sees the images in a
    seeded random order, as the official loader does, and every rank makes the whole pass (its result
    depends on the order, so it is not split across ranks)."""
    exact = cfg.bn_estimator == "exact"
    batches = normalised_batches(data, cfg.bn_batch_size, workers=workers, device=device, shard=exact,
                                 shuffle_seed=None if exact else derive_seed(cfg.seed, "bn order"),
                                 augment_seed=derive_seed(cfg.seed, "bn views") if cfg.bn_views == "augmented" else None)
    total = -(-len(data.train) // cfg.bn_batch_size // (world_size() if exact else 1))
    return bn_statistics(model, tqdm(batches, desc="BN statistics", disable=not progress, total=total), data.classes,
                         device, cfg.bn_estimator, cfg.bn_momentum)


def squeeze(data: ImageData, out_dir, cfg: TeacherConfig | None = None, device: str = "auto",
            progress: bool = True, teacher_checkpoint=None, restart: bool = False, workers: int | None = None) -> dict:
    """Train (or load) and save the teacher, its BN statistics and ``squeeze.json`` (last) under ``out_dir``.

    ``workers`` decode image files for every pass over real data (None: the cores but one, for folders).
    A finished run of the same data, settings and checkpoint is returned as it is; one of others is refused,
    since its images, labels and students came from its teacher; with ``restart`` they are removed first
    (the experiment runner does so when the squeeze settings change).
    """
    with claim(out_dir, "squeeze"):
        return _squeeze(data, Path(out_dir), cfg or TeacherConfig(), device, progress, teacher_checkpoint, restart,
                        workers)


def _squeeze(data: ImageData, out_dir: Path, cfg: TeacherConfig, device, progress, teacher_checkpoint, restart,
             workers) -> dict:
    dev = resolve_device(device)
    if cfg.epochs == 0 and not (cfg.pretrained or teacher_checkpoint):
        raise ValueError("teacher epochs=0 would keep an untrained teacher; train it (epochs >= 1), or start from "
                         "--pretrained weights or a teacher checkpoint")
    ident, marker = squeeze_identity(data, cfg, teacher_checkpoint), Marker(out_dir / SQUEEZE_MARKER)
    if marker.claim(ident, made_from_teacher(), restart, "a teacher and what was made from it (images, labels, "
                    "students)"):
        return read_json(out_dir / "squeeze.json")  # this very squeeze, finished: nothing rewritten
    marker.start(ident)
    progress = progress and is_main()
    start = time.time()
    if teacher_checkpoint:
        model, spec = load_model(teacher_checkpoint, dev)
        if spec["num_classes"] != data.num_classes:
            raise ValueError(f"{teacher_checkpoint} has {spec['num_classes']} classes, the data {data.num_classes}")
        if (spec["in_channels"], spec["image_size"]) != data.shape[:2]:
            raise ValueError(f"{teacher_checkpoint} takes {spec['in_channels']}x{spec['image_size']}x"
                             f"{spec['image_size']} images, the data is {'x'.join(map(str, data.shape))}; set "
                             f"data.image_size: {spec['image_size']} (--image-size {spec['image_size']})")
        wants = load_tensors(teacher_checkpoint)[1].get("normalize")  # set by `dsutil import-teacher`
        if wants is not None and data.source.get("normalize") != wants:
            raise ValueError(f"{teacher_checkpoint} was trained on images normalised as {wants!r}, the data is "
                             f"normalised as {data.source.get('normalize') or 'its own default'}; set "
                             f"data.normalize: {wants} (--normalize {wants})")
        cfg = TeacherConfig(**{**asdict(cfg), "arch": spec["arch"], "epochs": 0})
    else:  # under torchrun every rank trains on its share of each batch
        model = train_teacher(data, cfg, dev, progress, out_dir / "teacher_metrics.jsonl", workers)
    train_seconds = time.time() - start
    c, h, _ = data.shape
    if not teacher_checkpoint:
        spec = {"arch": cfg.arch, "num_classes": data.num_classes, "in_channels": c, "image_size": h,
                "width": cfg.width, "depth": cfg.depth}
    if is_main():
        save_model(out_dir / "teacher.safetensors", model, spec)
    barrier()
    model = load_model(out_dir / "teacher.safetensors", dev)[0]  # every rank: the teacher as saved
    metrics = evaluate(model, data, "test", dev, workers)  # each rank a share of the test split
    stats = measure_bn_statistics(model, data, cfg, dev, workers, progress)
    summary = {"dataset": data.describe(), "teacher": spec, "settings": asdict(cfg), "device": str(dev),
               "teacher_checkpoint": str(teacher_checkpoint) if teacher_checkpoint else None,
               "test_top1": metrics["top1"], "test_top5": metrics["top5"], "test_ece": metrics["ece"],
               "train_seconds": train_seconds, "seconds": time.time() - start}
    if is_main():
        stats.save(out_dir / "bn_stats.safetensors")
        write_json(out_dir / "squeeze.json", summary)
    marker.finish(summary["seconds"], SQUEEZE_OUTPUTS)  # the run is whole before any rank goes on
    return summary


def squeeze_identity(data: ImageData, cfg: TeacherConfig, teacher_checkpoint=None) -> Identity:
    """Squeeze's key: the data's settings (its description, where it was not loaded from settings), the
    teacher's, and the checkpoint it starts from (its path and its content)."""
    return Identity("squeeze", {"data": data.settings or data.describe(), "teacher": cfg, "checkpoint": teacher_checkpoint},
                    (file_sha256(teacher_checkpoint),) if teacher_checkpoint else ())


def load_squeezed(run_dir, device="cpu"):
    """Teacher, its spec, BN statistics and squeeze summary of a run; clear error if absent."""
    run_dir = Path(run_dir)
    for name in ("squeeze.json", "teacher.safetensors", "bn_stats.safetensors"):
        if not (run_dir / name).exists():
            raise FileNotFoundError(f"{run_dir / name} not found: run `dsutil squeeze --out {run_dir}` first")
    teacher, spec = load_model(run_dir / "teacher.safetensors", device)
    stats = BNStats.load(run_dir / "bn_stats.safetensors")
    if len(stats.classes) != spec["num_classes"]:
        raise ValueError(f"{run_dir / 'bn_stats.safetensors'} has {len(stats.classes)} classes but the teacher "
                         f"has {spec['num_classes']}; re-run `dsutil squeeze`")
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher, spec, stats, read_json(run_dir / "squeeze.json")
