"""Student training on stored soft labels, and evaluation on real held-out data."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .data import ImageData
from .evaluate import evaluate
from .files import atomic_path, save_model, write_json
from .labels import PRUNE_METRICS, LabelStore, LabelStoreError, check_prune_ratio, select_batches
from .models import build_model
from .relabel import replay
from .runtime import loader_workers, resolve_device
from .settings import non_negative, one_of, positive, require


@dataclass
class StudentConfig:
    arch: str = "convnet"
    width: int = 64
    depth: int = 3
    epochs: int | None = None  # default: the store's relabel epochs, whatever the pruning
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.01
    temperature: float = 4.0
    kl_times_t2: bool = False
    prune_ratio: float = 0.0
    metric: str = "random"
    granularity: str = "batch"
    online: bool = False  # the teacher labels every batch on the fly; nothing is stored or read
    workers: int = 0
    seed: int = 0

    def __post_init__(self):
        from .models import ARCHS

        one_of("arch", self.arch, ARCHS)
        one_of("optimizer", self.optimizer, ("adamw", "sgd"))
        one_of("metric", self.metric, PRUNE_METRICS)
        one_of("granularity", self.granularity, ("batch", "epoch"))
        require(self.epochs is None or self.epochs >= 1, "epochs", self.epochs,
                "1 or more (or unset: the store's relabel epochs)")
        for name in ("width", "depth", "lr", "temperature"):
            positive(name, getattr(self, name))
        for name in ("weight_decay", "workers"):
            non_negative(name, getattr(self, name))
        check_prune_ratio(self.prune_ratio)


class StoredBatches(Dataset):
    """Item i is the i-th step's whole batch: replayed augmented images and the stored logits.

    Whole batches as items let stock DataLoader workers read and replay them.
    """

    def __init__(self, store_path, images: torch.Tensor, schedule: list[tuple[int, int]]):
        self.store_path, self.images, self.schedule = store_path, images, schedule
        self.store = None

    def __len__(self) -> int:
        return len(self.schedule)

    def __getitem__(self, i):
        if self.store is None:  # opened per worker process
            self.store = LabelStore(self.store_path)
        rec = self.store.read(*self.schedule[i])
        return replay(self.images, rec), rec.logits


def batch_schedule(kept: list[tuple[int, int]], epochs: int, per_epoch: int, granularity: str,
                   seed: int) -> list[list[tuple[int, int]]]:
    """Which stored batch each step of each student epoch replays.

    ``batch``: every epoch draws ``per_epoch`` batches from the kept pool, cycling through
    shuffled passes over it. ``epoch``: student epoch e replays kept relabel epoch e mod k.
    """
    gen = torch.Generator().manual_seed(seed)
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


def kd_loss(student_logits, teacher_logits, temperature: float, times_t2: bool) -> torch.Tensor:
    """KL(softmax(z_t / T) || softmax(z_s / T)), batch mean, optionally times T^2."""
    t = temperature
    loss = F.kl_div(F.log_softmax(student_logits / t, 1), F.log_softmax(teacher_logits / t, 1),
                    reduction="batchmean", log_target=True)
    return loss * t * t if times_t2 else loss


def train_student(run_dir, store_path, cfg: StudentConfig, out_dir, device: str = "auto",
                  progress: bool = True, data: ImageData | None = None) -> dict:
    """Train a student from scratch on a label store (or online), evaluate on the real test split.

    Checkpoints every epoch into ``out_dir`` and resumes from there.
    """
    from .data import load_from_source
    from .recover import load_images, load_squeezed

    dev = resolve_device(device)
    check_prune_ratio(cfg.prune_ratio)
    workers = loader_workers(cfg.workers)
    out_dir = Path(out_dir)
    store = LabelStore(store_path)
    manifest = store.manifest
    images_path = Path(run_dir) / manifest["images"]  # relative to the run, unless recorded absolute
    store.check_images(images_path)
    images, _, _ = load_images(images_path.parent)
    teacher, spec, _, info = load_squeezed(run_dir, dev)
    data = data or load_from_source(info["dataset"]["source"])
    if store.num_classes != data.num_classes:
        raise LabelStoreError(f"label store {store.path} has {store.num_classes} classes, the student's data "
                              f"{data.num_classes}")
    epochs = cfg.epochs or manifest["epochs"]
    if cfg.online:
        kept = store.keys()
    else:
        store.check_files()
        kept = select_batches(store, cfg.prune_ratio, cfg.metric, cfg.granularity, cfg.seed)
    schedule = batch_schedule(kept, epochs, manifest["batches_per_epoch"], cfg.granularity, cfg.seed)
    c, h, _ = data.shape
    torch.manual_seed(cfg.seed)
    student = build_model(cfg.arch, data.num_classes, c, h, width=cfg.width, depth=cfg.depth).to(dev)
    if cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(student.parameters(), cfg.lr, weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "sgd":
        opt = torch.optim.SGD(student.parameters(), cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    else:
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}; expected adamw or sgd")
    steps = sum(len(s) for s in schedule)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    start_epoch, ckpt = 0, out_dir / "checkpoint.pt"
    if ckpt.exists():
        try:
            state = torch.load(ckpt, map_location=dev, weights_only=True)
        except Exception as e:  # anything but plain tensors and containers is refused, never run
            raise ValueError(f"{ckpt} is not a student checkpoint written by dsutil (it holds something other "
                             f"than tensors, or is damaged); remove it to train from scratch") from e
        student.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start_epoch = state["epoch"] + 1
    started = time.time()
    online_cfg = None
    if cfg.online:
        from .relabel import RelabelConfig, epoch_records

        a = manifest["settings"]
        online_cfg = RelabelConfig(**{k: a[k] for k in ("batch_size", "crop_scale", "flip", "mix", "mix_alpha")},
                                   epochs=epochs, seed=cfg.seed + 1)
    if cfg.online:
        batches = ((replay(images, r), None) for e in range(start_epoch, epochs)
                   for r in epoch_records(len(images), (h, h), online_cfg, e))
    else:  # one loader over every remaining step, so worker processes start once
        batches = DataLoader(StoredBatches(store.path, images, [k for s in schedule[start_epoch:] for k in s]),
                             batch_size=None, num_workers=workers)
    epoch_of_step = [e for e in range(start_epoch, epochs) for _ in schedule[e]]
    bar = tqdm(total=len(epoch_of_step), desc="student", disable=not progress)
    student.train()
    for step, (x, target) in enumerate(batches):
        x = x.to(dev)
        if target is None:
            with torch.no_grad():
                target = teacher(x).float()
        loss = kd_loss(student(x), target.to(dev), cfg.temperature, cfg.kl_times_t2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.update()
        epoch = epoch_of_step[step]
        if step + 1 == len(epoch_of_step) or epoch_of_step[step + 1] != epoch:  # end of a student epoch
            bar.set_postfix(epoch=epoch, loss=f"{loss.item():.4f}")
            with atomic_path(ckpt) as tmp:
                torch.save({"model": student.state_dict(), "optimizer": opt.state_dict(),
                            "scheduler": sched.state_dict(), "epoch": epoch}, tmp)
    bar.close()
    metrics = evaluate(student, data, "test", dev)
    n_kept = len(kept)
    label_bytes = 0 if cfg.online else store.kept_bytes(kept)
    result = {"settings": asdict(cfg), "epochs": epochs, "store": str(store.path), "kept_batches": n_kept,
              "stored_batches": len(store.keys()), "label_bytes": label_bytes,
              "test_top1": metrics["top1"], "test_top5": metrics["top5"], "test_ece": metrics["ece"],
              "seconds": time.time() - started, "device": str(dev), "workers": workers}
    save_model(out_dir / "student.safetensors", student,
               {"arch": cfg.arch, "num_classes": data.num_classes, "in_channels": c, "image_size": h,
                "width": cfg.width, "depth": cfg.depth})
    write_json(out_dir / "train.json", result)
    return result
