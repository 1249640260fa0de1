"""Recover: synthesise images by matching a teacher's BatchNorm statistics.

Two independent choices make a method (LPLD against SRe2L, as the paper contrasts them):

* grouping: ``cross-class`` groups hold one image of each class of a chunk of
  classes (SRe2L); ``class`` groups hold the IPC images of one class (LPLD);
* BN targets: ``global`` statistics of the whole training set, or each
  class's own (``class``). With class targets the statistics are taken over
  the images of each class inside a group.

The engine batches many groups through one teacher forward pass. The teacher
is in eval mode, so images do not interact inside it; statistics, losses and
augmentation draws are per group, each group with its own random generator,
so the images equal those of running the groups one at a time.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .augment import crop_flip, rrc_boxes
from .files import atomic_path, load_tensors, read_json, save_tensors, write_json
from .image_store import ENCODINGS, IMAGE_FORMATS, READ_BATCH, ImageSet, quantise, write_image_set
from .layout import MARKER, RECOVER_FILES, RECOVER_OUTPUTS, SQUEEZE_MARKER, recover_dir  # noqa: F401 (recover_dir: for callers)
from .runtime import barrier, derive_seed, is_main, log, my_share, resolve_device
from .settings import check_choices, check_crop_scale, non_negative, positive, require
from .squeeze import BNStats, bn_layers, load_squeezed
from .stage import Identity, Marker, input_key

METHODS = {  # name -> (grouping, BN targets)
    "sre2l": ("cross-class", "global"),
    "lpld": ("class", "class"),
    "cross-class-classbn": ("cross-class", "class"),
    "class-globalbn": ("class", "global"),
}
REAL = "real"
GLOBAL_TARGETS = ("running", "measured")
JITTER_RANGES = ("symmetric", "positive")


@dataclass
class RecoverConfig:
    method: str = "lpld"
    ipc: int = 10  # images per class
    iterations: int = 500
    lr: float = 0.25
    r_bn: float = 0.01  # weight of the BN loss
    first_bn_multiplier: float = 10.0  # extra weight of the first BN layer's loss
    jitter: int = 4  # largest random roll, pixels
    jitter_range: str = "symmetric"  # each roll drawn from -jitter..jitter, or 0..jitter (official ImageNet-1K)
    crop_scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area fractions of each view
    flip: bool = True  # horizontal flips of the views
    chunk_classes: int = 100  # classes per cross-class group
    global_targets: str = "running"  # running: the BN layers' own buffers (SRe2L); measured: squeeze's global
    # statistics, from the same views and estimator as the class targets (squeeze's bn_views, bn_estimator)
    batch_images: int = 200  # images per teacher forward pass; groups are packed up to this
    seed: int = 0
    bf16: bool = False  # bf16 autocast (GPUs)
    channels_last: bool = False  # channels-last memory format (GPUs)
    pixels: str = "uint8"  # how images.safetensors keeps the set: uint8 (as PNGs do) or normalised float32
    image_format: str = "lossless"  # uint8 pixels rounded, or jpeg75: the official truncation + JPEG-75 round trip
    CHOICES: ClassVar[dict] = {"method": (*METHODS, REAL), "global_targets": GLOBAL_TARGETS, "pixels": tuple(ENCODINGS),
                               "jitter_range": JITTER_RANGES, "image_format": IMAGE_FORMATS}
    # added after runs were made, with the value that gives the behaviour of before (sets were float32 before uint8
    # image stores); left out of a stage's key while they hold it
    ADDED: ClassVar[dict] = {"jitter_range": "symmetric", "pixels": "float32", "image_format": "lossless"}

    def __post_init__(self):
        check_choices(self)
        require(self.ipc > 0, "ipc", self.ipc, "a positive number of images per class")
        require(self.iterations > 0 or self.method == REAL, "iterations", self.iterations,
                "a positive number (real images need none)")
        if self.method == REAL:
            self.iterations = 0  # real images are picked, never iterated: so recorded and keyed
        self.crop_scale = tuple(self.crop_scale)
        check_crop_scale(self.crop_scale)
        for name in ("lr", "chunk_classes", "batch_images"):
            positive(name, getattr(self, name))
        for name in ("r_bn", "first_bn_multiplier", "jitter"):
            non_negative(name, getattr(self, name))
        require(self.image_format == "lossless" or self.pixels == "uint8", "image_format", self.image_format,
                "lossless, unless pixels is uint8 (a JPEG holds uint8 pixels)")


@dataclass
class Group:
    """One unit of work: images optimised together, with their labels and own seed."""

    name: str
    labels: torch.Tensor
    seed: int
    images: torch.Tensor | None = None
    ce: torch.Tensor | None = None  # final cross-entropy per image
    bn: float = math.nan  # final BN loss of the group
    extra: dict = field(default_factory=dict)


def make_groups(method: str, ipc: int, classes: range, seed: int, chunk_classes: int = 100) -> list[Group]:
    """The units of work for ``classes``; seeds depend only on the run seed and the unit."""
    grouping = METHODS[method][0]
    if grouping == "class":
        return [Group(f"class{c:05d}", torch.full((ipc,), c), derive_seed(seed, method, c)) for c in classes]
    groups = []
    for start in range(classes.start, classes.stop, chunk_classes):
        chunk = range(start, min(start + chunk_classes, classes.stop))
        for i in range(ipc):
            groups.append(Group(f"chunk{chunk.start:05d}-{chunk.stop:05d}_ipc{i:04d}", torch.tensor(list(chunk)),
                                derive_seed(seed, method, chunk.start, chunk.stop, i)))
    return groups


class BNTargets:
    """Per-layer target mean/var for every class (rows 0..C-1) and the global one (row C)."""

    def __init__(self, teacher, stats: BNStats, global_targets: str, device):
        layers = bn_layers(teacher)
        if [n for n, _ in layers] != stats.layers:
            raise ValueError("BN statistics were measured on a different model than this teacher")
        self.mean, self.var = [], []
        for i, (_, bn) in enumerate(layers):
            g_mean, g_var = ((bn.running_mean, bn.running_var) if global_targets == "running"
                             else (stats.global_mean[i], stats.global_var[i]))
            self.mean.append(torch.cat([stats.class_mean[i], g_mean.double().cpu()[None]]).float().to(device))
            self.var.append(torch.cat([stats.class_var[i], g_var.double().cpu()[None]]).float().to(device))
        self.global_row = len(stats.classes)


class PixelMoments(torch.autograd.Function):
    """Mean and mean square over the positions of every image and channel of ``feat`` (N x C x H x W),
    accumulated in float32 or better.

    Written out for its backward, one fused ``addcmul`` over the feature map: autograd's composition of
    the same reductions makes several image-sized passes (5x slower on a CPU, where the BN statistics
    otherwise cost as much as the teacher itself).
    """

    @staticmethod
    def forward(ctx, feat):
        ctx.save_for_backward(feat)  # the teacher keeps it for its own backward anyway
        flat, dtype = feat.flatten(2), torch.promote_types(feat.dtype, torch.float32)
        positions = flat.shape[2]
        return (flat.sum(2, dtype=dtype) / positions,
                torch.linalg.vector_norm(flat, dim=2, dtype=dtype) ** 2 / positions)

    @staticmethod
    def backward(ctx, grad_mean, grad_square):
        (feat,) = ctx.saved_tensors
        positions = feat.shape[2] * feat.shape[3]
        return torch.addcmul((grad_mean / positions).to(feat.dtype)[..., None, None],
                             (2 * grad_square / positions).to(feat.dtype)[..., None, None], feat)


def unit_statistics(feat: torch.Tensor, unit_of: torch.Tensor, unit_size: torch.Tensor):
    """Per-channel mean and biased variance of ``feat`` (N x C x H x W) over the pixels of all images of
    each unit (``unit_of``: the unit of every image; ``unit_size``: images per unit).

    The variance is E[x^2] - E[x]^2: in float32 its relative error is about 1e-7 x (1 + mean^2 / var),
    and BN inputs have mean^2 / var of a few at most (at most 6 per class on the MNIST teacher).
    """
    mean_img, square_img = PixelMoments.apply(feat)
    sums = lambda v: v.new_zeros(len(unit_size), v.shape[1]).index_add(0, unit_of, v)  # noqa: E731
    mean = sums(mean_img) / unit_size[:, None]
    return mean, sums(square_img) / unit_size[:, None] - mean ** 2


def augmentation_draws(gens: list[torch.Generator], cfg: RecoverConfig, size: tuple[int, int], device):
    """Every crop box, flip and shift of a recover, drawn up front group by group in iteration order (the same
    sequence per group as drawing iteration by iteration) and copied to the device once: iterations x groups x ..."""
    boxes, flips, shifts = [], [], []
    for gen in gens:
        b, f, s = [], [], []
        for _ in range(cfg.iterations):
            b.append(rrc_boxes(1, *size, cfg.crop_scale, generator=gen))
            f.append(torch.rand(1, generator=gen) < 0.5 if cfg.flip else torch.zeros(1, dtype=torch.bool))
            s.append(torch.randint(-cfg.jitter if cfg.jitter_range == "symmetric" else 0, cfg.jitter + 1, (1, 2),
                                   generator=gen))
        boxes.append(torch.cat(b)), flips.append(torch.cat(f)), shifts.append(torch.cat(s))
    return tuple(torch.stack(t, 1).to(device) for t in (boxes, flips, shifts))


def synthesize(teacher: torch.nn.Module, groups: list[Group], targets: BNTargets, method: str,
               cfg: RecoverConfig, image_shape: tuple[int, int, int], pixel_range, device, step=None) -> list[Group]:
    """Optimise the images of ``groups`` together in one batch; fills each group's images and losses.
    ``step()``, when given, is called after each iteration (a progress bar's)."""
    target_kind = METHODS[method][1]
    dt = next(teacher.parameters()).dtype  # float32 normally; float64 for exactness checks
    gens = [torch.Generator().manual_seed(g.seed) for g in groups]
    sizes = [len(g.labels) for g in groups]
    n = sum(sizes)
    x = torch.cat([torch.randn(s, *image_shape, generator=gen) for s, gen in zip(sizes, gens)]).to(device, dt)
    x.requires_grad_(True)
    labels = torch.cat([g.labels for g in groups]).to(device)
    group_of = torch.repeat_interleave(torch.arange(len(groups)), torch.tensor(sizes)).to(device)
    # statistics units: the whole group (global targets) or each class inside a group (class targets)
    if target_kind == "global":
        unit_of, unit_target = group_of, torch.full((len(groups),), targets.global_row, device=device)
        unit_group = torch.arange(len(groups), device=device)
    else:
        keys = group_of * (targets.global_row + 1) + labels
        uniq, unit_of = torch.unique(keys, return_inverse=True)
        unit_target, unit_group = uniq % (targets.global_row + 1), uniq // (targets.global_row + 1)
    n_units = len(unit_target)
    zeros = lambda *shape: torch.zeros(*shape, device=device, dtype=dt)  # noqa: E731
    unit_size = zeros(n_units).index_add_(0, unit_of, torch.ones(n, device=device, dtype=dt))
    units_per_group = zeros(len(groups)).index_add_(0, unit_group, torch.ones(n_units, device=device, dtype=dt))
    group_size = torch.tensor(sizes, device=device, dtype=dt)
    low, high = (p.to(device, dt) for p in pixel_range)

    boxes, flips, shifts = augmentation_draws(gens, cfg, image_shape[1:], device)  # per iteration x group

    bn_inputs = []
    hooks = [m.register_forward_hook(lambda m, i, o: bn_inputs.append(i[0])) for _, m in bn_layers(teacher)]
    opt = torch.optim.Adam([x], lr=cfg.lr, betas=(0.5, 0.9), eps=1e-8)
    multipliers = [cfg.first_bn_multiplier] + [1.0] * (len(hooks) - 1)
    try:
        for it in range(cfg.iterations):
            for pg in opt.param_groups:  # cosine decay without warm-up
                pg["lr"] = 0.5 * cfg.lr * (1 + math.cos(math.pi * it / cfg.iterations))
            xa = crop_flip(x, boxes[it][group_of], flips[it][group_of], shifts=shifts[it][group_of])
            bn_inputs.clear()
            with torch.autocast(device.type, torch.bfloat16, enabled=cfg.bf16):
                logits = teacher(xa.contiguous(memory_format=torch.channels_last) if cfg.channels_last else xa)
            ce = F.cross_entropy(logits.to(dt), labels, reduction="none")
            ce_group = zeros(len(groups)).index_add(0, group_of, ce) / group_size
            bn_unit = zeros(n_units)
            for a, feat, t_mean, t_var in zip(multipliers, bn_inputs, targets.mean, targets.var):
                mean, var = unit_statistics(feat, unit_of, unit_size)
                t_mean, t_var = t_mean.to(dt), t_var.to(dt)
                bn_unit = bn_unit + a * (torch.linalg.vector_norm(mean - t_mean[unit_target], dim=1)
                                         + torch.linalg.vector_norm(var - t_var[unit_target], dim=1))
            bn_group = zeros(len(groups)).index_add(0, unit_group, bn_unit) / units_per_group
            loss = (ce_group + cfg.r_bn * bn_group).sum()  # a sum, so each group gets its own gradient
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                x.data = torch.maximum(torch.minimum(x, high), low)
            if step is not None:
                step()
    finally:
        for h in hooks:
            h.remove()
    images = x.detach().float().cpu().split(sizes)
    for g, im, c, b in zip(groups, images, ce.detach().cpu().split(sizes), bn_group.detach().cpu()):
        g.images, g.ce, g.bn = im, c, float(b)
    return groups


def pack_groups(groups: list[Group], batch_images: int) -> list[list[Group]]:
    """Consecutive groups packed into teacher passes of at most ``batch_images`` images (at least one group)."""
    passes, current = [], []
    for g in groups:
        if current and sum(len(h.labels) for h in current) + len(g.labels) > batch_images:
            passes.append(current)
            current = []
        current.append(g)
    return passes + ([current] if current else [])


def parse_classes(text: str | None, num_classes: int) -> range:
    """``a:b`` (either end optional) -> range, checked against the dataset's class count."""
    if not text:
        return range(num_classes)
    try:
        a, b = (text.split(":") + [""])[:2] if ":" in text else (text, str(int(text) + 1))
        r = range(int(a) if a else 0, int(b) if b else num_classes)
    except ValueError:
        raise ValueError(f"--classes {text!r}: expected a:b with integers") from None
    if not (0 <= r.start < r.stop <= num_classes):
        raise ValueError(f"--classes {text!r} is outside the dataset's classes 0:{num_classes}")
    return r


def recover_in_memory(teacher, stats, cfg: RecoverConfig, num_classes: int, image_shape, pixel_range,
                      device) -> tuple[torch.Tensor, torch.Tensor]:
    """A small set made by the recover engine and kept in memory (nothing written): notebook 05's recovers.
    Returns the normalised images and their labels."""
    groups = make_groups(cfg.method, cfg.ipc, range(num_classes), cfg.seed, cfg.chunk_classes)
    synthesize(teacher, groups, BNTargets(teacher, stats, cfg.global_targets, device), cfg.method, cfg, image_shape,
               pixel_range, device)
    return torch.cat([g.images for g in groups]), torch.cat([g.labels for g in groups])


def recover(run_dir, cfg: RecoverConfig, classes: range | None = None, device: str = "auto",
            progress: bool = True, restart: bool = False) -> dict | None:
    """Synthesise (or pick, for ``real``) IPC images per class into the run's recover folder.

    Finished units are written atomically and skipped on a rerun, so a killed run resumes where it stopped.
    Returns the summary once every class is done; a finished folder of the same key (:func:`recover_identity`)
    is returned as it is; one made for another key is refused, or removed first with ``restart``.
    """
    dev = resolve_device(device)
    teacher, spec, stats, info = load_squeezed(run_dir, dev)
    if cfg.channels_last:
        teacher = teacher.to(memory_format=torch.channels_last)
    num_classes = spec["num_classes"]
    classes = classes or range(num_classes)
    if not (0 <= classes.start < classes.stop <= num_classes):
        raise ValueError(f"classes {classes.start}:{classes.stop} outside the dataset's 0:{num_classes}")
    out = recover_dir(run_dir, cfg.method, cfg.ipc)
    ident, marker = recover_identity(run_dir, cfg), Marker(out / MARKER)
    if marker.claim(ident, RECOVER_FILES, restart, "a distilled set"):
        return read_json(out / "recover.json")  # finished: returned as it is, no byte rewritten
    progress = progress and is_main()
    shape = (spec["in_channels"], spec["image_size"], spec["image_size"])
    mean, std = info["dataset"]["mean"], info["dataset"]["std"]
    low = torch.tensor([(0 - m) / s for m, s in zip(mean, std)]).view(-1, 1, 1)
    high = torch.tensor([(1 - m) / s for m, s in zip(mean, std)]).view(-1, 1, 1)
    start = time.time()
    # the units still missing, seen alike by every rank before any writes; each rank makes its share
    groups = [g for g in make_groups(cfg.method, cfg.ipc, classes, cfg.seed, cfg.chunk_classes)
              if not (out / "units" / f"{g.name}.safetensors").exists()] if cfg.method != REAL else []
    marker.start(ident)  # every rank has seen the units still missing
    if cfg.method == REAL:
        _pick_real(run_dir, info, cfg, classes, out)
        synth_seconds, image_iterations = 0.0, 0
    else:
        targets = BNTargets(teacher, stats, cfg.global_targets, dev)
        image_iterations = 0
        passes = pack_groups(my_share(groups), cfg.batch_images)
        with tqdm(total=len(passes) * cfg.iterations, desc=f"recover {cfg.method} ({len(passes)} passes)",
                  unit="it", disable=not progress) as bar:  # iterations: a rate and an estimate from the first pass
            for batch in passes:
                synthesize(teacher, batch, targets, cfg.method, cfg, shape, (low, high), dev, step=bar.update)
                for g in batch:
                    save_tensors(out / "units" / f"{g.name}.safetensors",
                                 {"images": g.images, "labels": g.labels, "ce": g.ce, "bn": torch.tensor([g.bn])})
                image_iterations += sum(len(g.labels) for g in batch) * cfg.iterations
        synth_seconds = time.time() - start
    barrier()  # every rank's units are written
    summary = assemble(run_dir, cfg, spec, info, teacher, dev, synth_seconds, image_iterations) if is_main() else None
    barrier()
    if not (out / "recover.json").exists():
        return None  # classes still to do (another range)
    marker.finish(time.time() - start, RECOVER_OUTPUTS)
    return summary if is_main() else read_json(out / "recover.json")


def recover_identity(run_dir, cfg: RecoverConfig) -> Identity:
    """A set's key: its settings and the run's teacher (squeeze's key); the teacher's file is its input."""
    teacher = Path(run_dir) / "teacher.safetensors"
    return Identity("recover", cfg, (input_key(teacher.parent / SQUEEZE_MARKER, teacher),), (teacher,))


def _pick_real(run_dir, info, cfg: RecoverConfig, classes: range, out: Path) -> None:
    from .data import load_from_source, train_targets

    data = load_from_source(info["dataset"]["source"])
    targets = train_targets(data.train)
    for c in my_share(list(classes)):
        idx = torch.nonzero(targets == c).flatten()
        if len(idx) < cfg.ipc:
            raise ValueError(f"class {data.classes[c]} has {len(idx)} training images, fewer than ipc={cfg.ipc}")
        gen = torch.Generator().manual_seed(derive_seed(cfg.seed, REAL, c))
        idx = idx[torch.randperm(len(idx), generator=gen)[:cfg.ipc]]
        images = data.normalize(torch.stack([data.train[int(i)][0] for i in idx]))
        save_tensors(out / "units" / f"class{c:05d}.safetensors",
                     {"images": images, "labels": torch.full((cfg.ipc,), c), "index": idx})


def assemble(run_dir, cfg: RecoverConfig, spec, info, teacher, device, synth_seconds, image_iterations):
    """Join the unit files into ``images.safetensors`` (in class order), PNGs and ``recover.json`` once all
    classes are done; streamed a batch of rows at a time, never the whole set in memory."""
    from safetensors import safe_open

    out = recover_dir(run_dir, cfg.method, cfg.ipc)
    units = sorted((out / "units").glob("*.safetensors"))
    if not units:
        return None
    small = [{k: v for k, v in load_tensors(u)[0].items() if k != "images"} for u in units]  # labels, losses
    labels = torch.cat([p["labels"] for p in small])
    counts = torch.bincount(labels, minlength=spec["num_classes"])
    if (counts < cfg.ipc).any():
        missing = (counts < cfg.ipc).sum().item()
        log.info(f"{out}: {missing} of {spec['num_classes']} classes still to do; run the other class ranges")
        return None
    where = [(u, r) for u, p in zip(units, small) for r in range(len(p["labels"]))]  # unit and row of each image
    order = torch.argsort(labels, stable=True)
    classes, mean, std = info["dataset"]["classes"], info["dataset"]["mean"], info["dataset"]["std"]

    def rows():
        for a in range(0, len(order), READ_BATCH):
            batch = [where[i] for i in order[a:a + READ_BATCH].tolist()]
            opened = {u: safe_open(str(u), framework="pt") for u in {u for u, _ in batch}}
            x = torch.stack([opened[u].get_slice("images")[r] for u, r in batch])
            yield quantise(x, mean, std, cfg.image_format) if cfg.pixels == "uint8" else x

    shape = (spec["in_channels"], spec["image_size"], spec["image_size"])
    write_image_set(out / "images.safetensors", labels[order], shape, rows(),
                    {"classes": classes, "method": cfg.method, "ipc": cfg.ipc, "mean": mean, "std": std}, cfg.pixels)
    images = ImageSet(out / "images.safetensors")
    write_pngs(images, out / "png")
    correct = (predicted(teacher, images, device) == images.labels).float()
    labels = images.labels
    summary = {"method": cfg.method, "ipc": cfg.ipc, "settings": asdict(cfg), "teacher": spec,
               "images": len(images), "classes": classes, "pixels": cfg.pixels,
               "teacher_top1_on_images": float(correct.mean()),
               "teacher_top1_per_class": [float(correct[labels == c].mean()) for c in range(len(classes))],
               "seconds_this_process": synth_seconds,
               "image_iterations_per_second": image_iterations / synth_seconds if synth_seconds else None}
    if cfg.method != REAL:
        ce = torch.cat([p["ce"] for p in small])[order]
        bn = torch.cat([p["bn"].expand(len(p["labels"])) for p in small])[order]
        summary["final_loss_per_class"] = {"ce": [float(ce[labels == c].mean()) for c in range(len(classes))],
                                           "bn": [float(bn[labels == c].mean()) for c in range(len(classes))]}
    write_json(out / "recover.json", summary)
    return summary


def write_pngs(images: ImageSet, root: Path) -> None:
    """The set as PNGs in an ImageFolder layout, ``root/<class>/<k>.png``: the files other tools read."""
    from PIL import Image

    counts: dict[int, int] = {}
    for a in range(0, len(images), READ_BATCH):
        pixels = images.pixels(slice(a, a + READ_BATCH)).permute(0, 2, 3, 1).numpy()
        for img, c in zip(pixels, images.labels[a:a + READ_BATCH].tolist()):
            k = counts[c] = counts.get(c, -1) + 1
            with atomic_path(root / images.classes[c] / f"{k:05d}.png") as tmp:
                Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(tmp, format="PNG")


@torch.no_grad()
def predicted(model: torch.nn.Module, images: ImageSet, device) -> torch.Tensor:
    """The model's class for every image of a stored set, streamed in batches."""
    model.eval()
    return torch.cat([model(x.to(device)).argmax(1).cpu() for x, _ in images.batches()])


def load_images(recover_path) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Normalised images, labels and metadata of a finished recover folder, all in memory (for analyses of
    small sets; the stages stream them with :class:`dsutil.image_store.ImageSet`)."""
    images = ImageSet(Path(recover_path) / "images.safetensors")
    return images[:], images.labels, images.meta
