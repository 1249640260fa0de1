"""Student training on stored soft labels, and evaluation on real held-out data."""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .data import ImageData
from .dynamics import Dynamics, load_scores
from .evaluate import evaluate
from .files import atomic_path, claim, read_json, save_model, save_tensors, write_json, write_metrics
from .image_store import ImageSet
from .labels import DYNAMICS_METRICS, PRUNE_METRICS, PRUNE_POOLS, LabelStore, LabelStoreError, check_prune_ratio, coverage, select_batches
from .layout import MARKER, STUDENT_FILES, STUDENT_OUTPUTS
from .models import ARCHS, NORMS, build_model
from .replay import StepBatches
from .runtime import (
    LoaderWait,
    gather_rows,
    is_main,
    loader_options,
    loader_workers,
    my_rows,
    resolve_device,
    sum_over_ranks,
    world_size,
)
from .schedules import lr_schedule
from .settings import check_choices, non_negative, positive, require
from .stage import Identity, Marker, input_key

SCHEDULES = ("constant", "step", "cosine")
DRAWS = ("cycle", "replacement")  # how student epochs draw from the kept pool (see batch_schedule)
CHECKPOINT_SECONDS = 120.0  # a student checkpoint at most this often (and after the last epoch)


@dataclass
class StudentConfig:
    arch: str = "convnet"
    width: int = 64
    depth: int = 3
    norm: str = "batch"  # convnet's normalisation: batch, or instance (per image)
    epochs: int | None = None  # default: the store's relabel epochs, whatever the pruning
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.01
    temperature: float = 4.0  # applied to the stored (teacher) logits; the start of a schedule
    temperature_schedule: str = "constant"  # constant, step (x gamma every step_epochs) or cosine (down to min)
    temperature_step_epochs: int = 30
    temperature_gamma: float = 0.7
    temperature_min: float = 1.0
    student_temperature: float | None = None  # fixed student temperature (None: temperature_ratio x the teacher's)
    temperature_ratio: float = 1.0  # student temperature = ratio x the teacher-side one, when not fixed
    kl_times_t2: bool = False  # multiply the KL by the student temperature squared
    hard_epochs: float = 0.0  # fraction of the epochs, the last ones, trained on hard labels with fresh crops
    hard_weight: float = 0.0  # in soft epochs, loss = (1 - w) KL + w cross-entropy on the hard labels
    prune_ratio: float = 0.0
    metric: str = "random"
    pool: str = "uniform"  # random pruning keeps: uniform, first (official) or balanced (labels.PRUNE_POOLS)
    draw: str = "cycle"  # each epoch's batches: cycle (shuffled passes over the pool) or replacement (official)
    warmup_epochs: int = 0  # linear learning-rate warm-up before the cosine decay (the official Tiny-ImageNet: 5)
    decay_1d: bool = True  # weight decay on 1-D parameters (BN weights, biases) too; the official code exempts them
    scores_from: str | None = None  # a student folder whose dynamics.safetensors scores el2n/aum/forgetting
    granularity: str = "batch"
    online: bool = False  # the teacher labels every batch on the fly; nothing is stored or read
    workers: int = 0  # DataLoader worker processes
    seed: int = 0
    CHOICES: ClassVar[dict] = {"arch": ARCHS, "norm": NORMS, "optimizer": ("adamw", "sgd"), "metric": PRUNE_METRICS,
                               "granularity": ("batch", "epoch"), "pool": PRUNE_POOLS, "draw": DRAWS,
                               "temperature_schedule": SCHEDULES}
    # added after runs were made, with the value that gives the behaviour of before; left out of a stage's key while
    # they hold it
    ADDED: ClassVar[dict] = {"norm": "batch", "temperature_schedule": "constant", "temperature_step_epochs": 30,
                             "temperature_gamma": 0.7, "temperature_min": 1.0, "student_temperature": None,
                             "temperature_ratio": 1.0, "hard_epochs": 0.0, "hard_weight": 0.0, "pool": "uniform",
                             "draw": "cycle", "warmup_epochs": 0, "decay_1d": True, "scores_from": None}

    def __post_init__(self):
        check_choices(self)
        require(self.norm == "batch" or self.arch == "convnet", "norm", self.norm, "batch, unless arch is convnet")
        require(self.pool == "uniform" or self.metric == "random", "pool", self.pool,
                "uniform, unless the metric is random (the other metrics choose their own batches)")
        non_negative("warmup_epochs", self.warmup_epochs)
        require(self.epochs is None or self.epochs >= 1, "epochs", self.epochs,
                "1 or more (or unset: the store's relabel epochs)")
        for name in ("width", "depth", "lr", "temperature", "temperature_step_epochs", "temperature_gamma",
                     "temperature_min", "temperature_ratio"):
            positive(name, getattr(self, name))
        require(self.student_temperature is None or self.student_temperature > 0, "student_temperature",
                self.student_temperature, "a positive number (or unset: temperature_ratio x the teacher's)")
        for name in ("weight_decay", "workers"):
            non_negative(name, getattr(self, name))
        for name in ("hard_epochs", "hard_weight"):
            require(0 <= getattr(self, name) <= 1, name, getattr(self, name), "a fraction in [0, 1]")
        check_prune_ratio(self.prune_ratio)
        require(self.temperature_schedule != "cosine" or self.temperature_min <= self.temperature, "temperature_min",
                self.temperature_min, f"at most temperature ({self.temperature}): the cosine schedule goes down to it")
        require(self.scores_from is None or self.metric in DYNAMICS_METRICS, "scores_from", self.scores_from,
                f"unset, unless the metric is one of {', '.join(DYNAMICS_METRICS)}")

    def temperatures(self, epoch: int, epochs: int) -> tuple[float, float]:
        """Teacher-side and student temperature in a student epoch (LPQLD's schedules and ratio)."""
        t = self.temperature
        if self.temperature_schedule == "step":
            t *= self.temperature_gamma ** (epoch // self.temperature_step_epochs)
        elif self.temperature_schedule == "cosine":
            t = self.temperature_min + (t - self.temperature_min) * (1 + math.cos(math.pi * epoch / max(1, epochs - 1))) / 2
        return t, self.student_temperature or t * self.temperature_ratio

    def hard_epoch_count(self, epochs: int) -> int:
        """The last epochs on hard labels: the fraction's whole epochs, rounded down (0.75 of 2 is 1)."""
        return math.floor(epochs * self.hard_epochs + 1e-9)


def batch_schedule(kept: list[tuple[int, int]], epochs: int, per_epoch: int, granularity: str,
                   seed: int, draw: str = "cycle") -> list[list[tuple[int, int]]]:
    """Which stored batch each step of each student epoch replays.

    ``batch``: every epoch draws ``per_epoch`` batches from the kept pool, cycling through shuffled passes
    over it (``cycle``), or each one uniformly from the whole pool (``replacement``, as the official code).
    ``epoch``: student epoch e replays kept relabel epoch e mod k.
    """
    gen = torch.Generator().manual_seed(seed)
    if granularity == "batch" and draw == "replacement":
        return [[kept[i] for i in torch.randint(len(kept), (per_epoch,), generator=gen).tolist()]
                for _ in range(epochs)]
    if granularity == "epoch":
        by_epoch = {}
        for e, b in kept:
            by_epoch.setdefault(e, []).append((e, b))
        kept_epochs = sorted(by_epoch)
        return [[by_epoch[kept_epochs[s % len(kept_epochs)]][i]
                 for i in torch.randperm(len(by_epoch[kept_epochs[s % len(kept_epochs)]]), generator=gen)]
                for s in range(epochs)]
    stream: list[tuple[int, int]] = []
    while len(stream) < epochs * per_epoch:
        stream += [kept[i] for i in torch.randperm(len(kept), generator=gen)]
    return [stream[s * per_epoch:(s + 1) * per_epoch] for s in range(epochs)]


def kd_loss(student_logits, teacher_logits, temperature: float, times_t2: bool,
            student_temperature: float | None = None, target: str = "logits") -> torch.Tensor:
    """KL(softmax(z_t / T) || softmax(z_s / T_s)), batch mean, optionally times T_s^2 (T_s defaults to T).

    ``target``: ``logits`` (every class finite), ``sparse`` (logits with -inf where a top-k label gives
    probability zero: those classes add nothing) or ``log_probs`` (MS-k: fixed log-probabilities used as they
    are, with no temperature and no renormalisation; -inf for zero).
    """
    t, ts = temperature, student_temperature or temperature
    log_q = F.log_softmax(student_logits / ts, 1)
    if target == "logits":
        loss = F.kl_div(log_q, F.log_softmax(teacher_logits / t, 1), reduction="batchmean", log_target=True)
    else:
        log_p = teacher_logits if target == "log_probs" else F.log_softmax(teacher_logits / t, 1)
        loss = (log_p.exp() * (log_p.clamp_min(torch.finfo(log_p.dtype).min) - log_q)).sum() / len(log_q)
    return loss * ts * ts if times_t2 else loss


def hard_loss(student_logits, y, y_partner, lam: float) -> torch.Tensor:
    """Cross-entropy on the images' class labels; a mixed batch weighs its two labels by the mix weight."""
    loss = F.cross_entropy(student_logits, y)
    return loss if lam == 1.0 else lam * loss + (1 - lam) * F.cross_entropy(student_logits, y_partner)


def make_optimizer(model: torch.nn.Module, cfg: StudentConfig) -> torch.optim.Optimizer:
    """AdamW or SGD (momentum 0.9); without ``decay_1d``, 1-D parameters (BN weights, biases) get no weight
    decay, as in the official code."""
    params = list(model.parameters())
    groups = [{"params": params}] if cfg.decay_1d else \
        [{"params": [p for p in params if p.ndim > 1]},
         {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(groups, cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)


def train_student(run_dir, store_path, cfg: StudentConfig, out_dir, device: str = "auto",
                  progress: bool = True, data: ImageData | None = None, restart: bool = False,
                  keep_checkpoint: bool = False, checkpoint_seconds: float = CHECKPOINT_SECONDS) -> dict:
    """Train a student from scratch on a label store (or online), evaluate on the real test split.

    ``out_dir`` gets student.safetensors, train.json, metrics.jsonl (one line per epoch) and its marker,
    stage.json (finished last; its key: :func:`student_identity`). An interrupted run resumes from ``checkpoint.pt`` (a torch.save
    zip of tensors, read with weights_only=True), which is removed at the end unless ``keep_checkpoint``.
    It is written after the first epoch that ends ``checkpoint_seconds`` or more after the last one (0: every
    epoch), and after the last epoch: a ResNet-18's weights and AdamW state are about 130 MiB, too much to write
    after every short epoch on a GPU; a crash loses at most that many seconds of training.
    A folder holding a student of another key is refused, or cleared first with ``restart``.
    """
    with claim(out_dir, "train"):  # one writer at a time: a second one is refused, not interleaved
        return _train_student(run_dir, store_path, cfg, Path(out_dir), device, progress, data, restart,
                              keep_checkpoint, checkpoint_seconds)


def student_identity(store_path, cfg: StudentConfig) -> Identity:
    """A student's key: its settings and its labels' key (the store's stage, which names its images); the
    store's manifest and the scores it prunes by are its inputs."""
    manifest = Path(store_path) / "manifest.json"
    scores = (Path(cfg.scores_from) / "dynamics.safetensors",) if cfg.scores_from else ()
    return Identity("student", cfg, (input_key(manifest.parent / MARKER, manifest),), (manifest, *scores))


def _train_student(run_dir, store_path, cfg: StudentConfig, out_dir: Path, device, progress, data, restart,
                   keep_checkpoint, checkpoint_seconds) -> dict:
    from .data import load_from_source
    from .squeeze import load_squeezed

    non_negative("checkpoint_seconds", checkpoint_seconds)
    dev, workers, store = resolve_device(device), loader_workers(cfg.workers), LabelStore(store_path)
    manifest = store.manifest
    images_path = Path(run_dir) / manifest["images"]  # relative to the run, unless recorded absolute
    store.check_images(images_path)
    require(cfg.metric not in DYNAMICS_METRICS or cfg.scores_from is not None, "scores_from", None,
            f"a trained student's folder, whose dynamics.safetensors scores {cfg.metric} pruning")
    scores_file = Path(cfg.scores_from) / "dynamics.safetensors" if cfg.scores_from else None
    ident, marker = student_identity(store.path, cfg), Marker(out_dir / MARKER)
    if marker.claim(ident, STUDENT_FILES, restart, "a student"):
        return read_json(out_dir / "train.json")  # this very student, finished
    marker.start(ident)
    images = ImageSet(images_path)  # read a batch at a time
    teacher, _, _, info = load_squeezed(run_dir, dev)
    data = data or load_from_source(info["dataset"]["source"])
    if store.num_classes != data.num_classes:
        raise LabelStoreError(f"label store {store.path} has {store.num_classes} classes, the student's data "
                              f"{data.num_classes}")
    plan = StudentPlan.make(store, cfg, len(images), scores_file)
    student, model, spec = build_student(cfg, data, dev)
    opt = make_optimizer(student, cfg)
    sched = lr_schedule(opt, len(plan.steps), round(cfg.warmup_epochs * len(plan.steps) / plan.epochs))
    dynamics = Dynamics(len(images), early_epochs=max(1, round(0.1 * plan.epochs)), device=dev)
    ckpt = Checkpoint(out_dir / "checkpoint.pt", ident.key)
    start_epoch, history = ckpt.resume(student, opt, sched, dynamics, out_dir / "metrics.jsonl")
    labels = LabelSource(cfg, plan.soft_epochs, teacher, store, dev)
    batches = plan.loader(images, store, manifest["settings"], cfg.seed, start_epoch, workers, dev)
    started = saved = time.time()
    with tqdm(total=len(batches.loader.dataset), desc=f"student {out_dir.name}",
              disable=not (progress and is_main())) as bar:  # closed on errors too
        model.train()
        steps = iter(batches)
        for epoch in range(start_epoch, plan.epochs):
            waited, began = batches.seconds, time.time()
            loss, n = train_one_epoch(model, steps, plan.steps_in(epoch), epoch, plan.epochs, cfg, labels, dynamics,
                                      opt, sched, bar)
            if not math.isfinite(loss):  # diverged: stop before any weights of it are saved
                raise ValueError(f"student training diverged: the loss of epoch {epoch} is {loss} "
                                 f"(lr={cfg.lr}, temperature={cfg.temperatures(epoch, plan.epochs)[0]}); lower the learning rate")
            t_teacher, t_student = cfg.temperatures(epoch, plan.epochs)
            history.append({"epoch": epoch, "loss": loss / n / world_size(), "lr": sched.get_last_lr()[0],
                            "temperature": t_teacher, "student_temperature": t_student, "labels": labels.kind(epoch),
                            "steps": n, "seconds": time.time() - started, "epoch_seconds": time.time() - began,
                            "loader_wait_seconds": batches.seconds - waited})
            bar.set_postfix(epoch=epoch, loss=f"{history[-1]['loss']:.4f}")
            if is_main():
                write_metrics(out_dir / "metrics.jsonl", history)
                if epoch == plan.epochs - 1 or time.time() - saved >= checkpoint_seconds:
                    ckpt.save(student, opt, sched, epoch, dynamics)
                    saved = time.time()
    metrics = evaluate(student, data, "test", dev)  # under torchrun: each rank a share, gathered
    used = sorted({(e, b) for kind, e, b in plan.steps if kind == "stored"})  # the labels this student needed
    result = {"settings": asdict(cfg), "epochs": plan.epochs, "hard_epochs": plan.epochs - plan.soft_epochs,
              "store": str(store.path), "kept_batches": len(plan.kept), "used_batches": len(used),
              **coverage(store, used, len(images)),
              "stored_batches": len(store.keys()), "label_bytes": store.kept_bytes(used),
              "test_top1": metrics["top1"], "test_top5": metrics["top5"], "test_ece": metrics["ece"],
              "seconds": time.time() - started, "device": str(dev), "workers": workers, "ranks": world_size()}
    if is_main():
        save_model(out_dir / "student.safetensors", student, spec)
        save_tensors(out_dir / "dynamics.safetensors", dynamics.scores(), {"early_epochs": dynamics.early_epochs,
                                                                             "images_sha256": manifest["images_sha256"]})
        write_json(out_dir / "train.json", result)
        if not keep_checkpoint:
            ckpt.path.unlink()
    marker.finish(result["seconds"], STUDENT_OUTPUTS)  # last: the student is finished
    return result


@dataclass
class StudentPlan:
    """What a student trains on, step by step: ``steps[i]`` is ("stored", epoch, batch) or ("fresh", epoch, batch)
    (crops drawn afresh: online and hard-label epochs), ``step_epoch[i]`` the student epoch it belongs to."""
    epochs: int
    soft_epochs: int
    kept: list[tuple[int, int]]
    steps: list[tuple[str, int, int]]
    step_epoch: list[int]

    @classmethod
    def make(cls, store: LabelStore, cfg: StudentConfig, n_images: int, scores_file) -> StudentPlan:
        manifest = store.manifest
        epochs = cfg.epochs or manifest["epochs"]
        soft_epochs = epochs - cfg.hard_epoch_count(epochs)
        if cfg.online or soft_epochs == 0:  # no stored label is read
            kept = store.keys()
        else:
            store.check_files()
            kept = select_batches(store, cfg.prune_ratio, cfg.metric, cfg.granularity, cfg.seed,
                                  load_scores(scores_file, manifest["images_sha256"], n_images) if scores_file else None,
                                  cfg.pool)
        require(cfg.warmup_epochs < epochs, "warmup_epochs", cfg.warmup_epochs, f"fewer than the {epochs} epochs")
        schedule = batch_schedule(kept, epochs, manifest["batches_per_epoch"], cfg.granularity, cfg.seed, cfg.draw)
        steps, step_epoch = [], []
        for e in range(epochs):
            if cfg.online or e >= soft_epochs:  # crops drawn afresh, labelled by the teacher or by the class
                steps += [("fresh", e, b) for b in range(manifest["batches_per_epoch"])]
            else:
                steps += [("stored", *k) for k in schedule[e]]
            step_epoch += [e] * (len(steps) - len(step_epoch))
        return cls(epochs, soft_epochs, kept, steps, step_epoch)

    def steps_in(self, epoch: int) -> int:
        return self.step_epoch.count(epoch)

    def loader(self, images: ImageSet, store: LabelStore, relabel_settings: dict, seed: int, start_epoch: int,
               workers: int, dev) -> LoaderWait:
        """One loader over every step from ``start_epoch`` on (its workers start once); fresh crops follow the
        store's augmentation."""
        from .relabel import RelabelConfig

        fresh_cfg = RelabelConfig(**{k: relabel_settings[k] for k in ("batch_size", "crop_scale", "flip", "mix", "mix_alpha")},
                                  epochs=self.epochs, seed=seed + 1)
        first = self.step_epoch.index(start_epoch) if start_epoch < self.epochs else len(self.steps)
        batches = StepBatches(images, self.steps[first:], fresh_cfg, store.path)
        return LoaderWait(DataLoader(batches, batch_size=None, **loader_options(batches, workers, dev)))


def build_student(cfg: StudentConfig, data: ImageData, dev) -> tuple[torch.nn.Module, torch.nn.Module, dict]:
    """The student (seeded), what the steps run (under torchrun: DDP around it, gradients averaged) and its spec."""
    c, h, _ = data.shape
    torch.manual_seed(cfg.seed)
    spec = {"arch": cfg.arch, "num_classes": data.num_classes, "in_channels": c, "image_size": h,
            "width": cfg.width, "depth": cfg.depth} | ({"norm": cfg.norm} if cfg.norm != "batch" else {})
    student = model = build_model(**spec).to(dev)
    if world_size() > 1:
        if dev.type == "cuda":  # BN statistics over the whole batch, as one process has them
            student = model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(student)
        model = torch.nn.parallel.DistributedDataParallel(student, device_ids=[dev] if dev.type == "cuda" else None)
    return student, model, spec


class LabelSource:
    """The targets of a step: the stored logits, the teacher's on the fly (online), or none (hard-label epochs)."""

    def __init__(self, cfg: StudentConfig, soft_epochs: int, teacher, store: LabelStore, dev):
        self.online, self.soft_epochs, self.teacher, self.dev = cfg.online, soft_epochs, teacher, dev
        self.target_kind = "log_probs" if store.holds_probs else "sparse" if store.topk and store.topk_fill == "zero" \
            else "logits"

    def kind(self, epoch: int) -> str:
        return "hard" if epoch >= self.soft_epochs else "online" if self.online else "soft"

    def targets(self, epoch: int, x, stored, batch_rows: int):
        """The whole batch's soft targets on the device (None in hard-label epochs)."""
        if self.online and epoch < self.soft_epochs:
            with torch.no_grad():
                return gather_rows(self.teacher(x).float(), batch_rows)
        return None if stored is None else stored.to(self.dev, non_blocking=True)


def train_one_epoch(model, steps, n_steps: int, epoch: int, epochs: int, cfg: StudentConfig, labels: LabelSource,
                    dynamics: Dynamics, opt, sched, bar) -> tuple[float, int]:
    """``n_steps`` steps of ``steps``; returns the loss summed over them and over ranks (one host sync) and their
    number."""
    t_teacher, t_student = cfg.temperatures(epoch, epochs)
    loss_sum = torch.zeros((), device=labels.dev)  # summed on the device: no host sync per step
    for _ in range(n_steps):
        x, stored, index, y, y_partner, lam = next(steps)
        mine = my_rows(len(index))  # under torchrun this rank's share of the batch; DDP averages the gradients
        x, y, y_partner = (t[mine].to(labels.dev, non_blocking=True) for t in (x, y, y_partner))
        target = labels.targets(epoch, x, stored, len(index))  # copied once for the loss and the dynamics
        out = model(x)
        if epoch >= labels.soft_epochs:
            loss = hard_loss(out, y, y_partner, lam)
        else:
            loss = kd_loss(out, target[mine], t_teacher, cfg.kl_times_t2, t_student, labels.target_kind)
            dynamics.observe(index, gather_rows(out.detach(), len(index)), target, epoch)
            if cfg.hard_weight:
                loss = (1 - cfg.hard_weight) * loss + cfg.hard_weight * hard_loss(out, y, y_partner, lam)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.update()
        loss_sum = loss_sum + loss.detach()
    sum_over_ranks([loss_sum])
    return float(loss_sum), n_steps


class Checkpoint:
    """``checkpoint.pt``: the student, optimiser, schedule and dynamics after an epoch (a torch.save zip of
    tensors, read with weights_only=True), with the student's key (its stage marker's)."""

    def __init__(self, path: Path, key: str):
        self.path, self.key = path, key

    def save(self, student, opt, sched, epoch: int, dynamics: Dynamics) -> None:
        with atomic_path(self.path) as tmp:
            torch.save({"model": student.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                        "epoch": epoch, "key": self.key, "dynamics": dynamics.state}, tmp)

    def resume(self, student, opt, sched, dynamics: Dynamics, metrics_file: Path) -> tuple[int, list[dict]]:
        """The first epoch to train and the metrics of those before it (0 and none without a checkpoint)."""
        if not self.path.exists():
            return 0, []
        state = _load_checkpoint(self.path, next(student.parameters()).device)
        if state.get("key") != self.key:
            raise ValueError(f"{self.path} is a checkpoint of another student (key {state.get('key')}, this one's "
                             f"{self.key}); remove it, or pass --restart")
        student.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        dynamics.state = state["dynamics"]
        start = state["epoch"] + 1
        return start, [json.loads(line) for line in metrics_file.read_text().splitlines()][:start]


def _load_checkpoint(path: Path, device) -> dict:
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # anything but plain tensors and containers is refused, never run
        raise ValueError(f"{path} is not a student checkpoint written by dsutil (it holds something other "
                         f"than tensors, or is damaged); remove it to train from scratch") from e
