"""The experiment runner: every stage of a preset, reused when its marker says it is finished.

Each stage keeps one marker (:mod:`dsutil.stage`): its key, a hash of its settings and of its inputs' keys. A
rerun reuses a stage whose key is unchanged and redoes one whose settings or inputs changed, and with it
everything downstream, because downstream keys include upstream ones.
"""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import torch

from .analysis import streamed_within_class_cosine
from .config import ExperimentConfig
from .files import claim, json_ready, read_json, remove_own, write_json
from .image_store import ImageSet
from .labels import DYNAMICS_METRICS, LabelStore
from .layout import (
    MARKER,
    RECOVER_FILES,
    SQUEEZE_MARKER,
    STORE_FILES,
    STUDENT_FILES,
    label_store_dir,
    made_from_teacher,
    recover_dir,
    student_dir,
)
from .models import feature_batches
from .protocol import add_label_robust_scores, full_real_reference, hard_label_config, image_bytes
from .provenance import describe, provenance
from .recover import recover, recover_identity
from .relabel import relabel, relabel_identity
from .runtime import barrier, derive_seed, dsutil_environment, is_main, log, rank_log, resolve_device
from .squeeze import load_squeezed, squeeze, squeeze_identity
from .stage import Identity, Marker, StageMismatch
from .train import student_identity, train_student


class Stages:
    """Runs or reuses stages, and remembers which it did and how long each took (when it ran)."""

    def __init__(self, progress: bool = True):
        self.reused: list[str] = []
        self.ran: list[str] = []
        self.seconds: dict[str, float] = {}
        self.progress = progress

    def __call__(self, name: str, marker: Path, ident: Identity, fn, own: tuple[str, ...]) -> str:
        """Reuse the stage when its marker's claim (:meth:`Marker.claim`, the one its command makes) finds it
        finished with ``ident``'s key and its outputs as written, else run ``fn`` (which resumes an unfinished run
        of the same key). A folder of stale files of the stage (other settings or inputs, outputs gone) first loses
        them (``own``: glob patterns in the marker's folder; the user's files stay); one whose outputs were changed
        after they were written is refused. All under the folder's lock: a folder another process writes is never
        touched."""
        marker = Marker(marker)
        with claim(marker.path.parent, f"dsutil run's {name}"):
            stale = None
            try:
                done = marker.claim(ident, own, False, f"the outputs of {name}")
            except StageMismatch as e:
                if not e.redo:
                    raise ValueError(f"{e.problem}; restore them, or remove them and run again (dsutil run makes a "
                                     "stage whose files are gone again, and every stage made from it)") from None
                done, stale = False, e
            barrier()  # under torchrun every rank decides before any writes
            if stale is not None:
                log.info(f"[dsutil] {name}: {stale.problem}; made again")
                marker.clear(own)
            if done:
                self.reused.append(name)
                self.seconds[name] = marker.seconds()
                return ident.key
            if self.progress:
                log.info(f"[dsutil] {name} ...")
            start = time.time()
            fn()
        recorded = marker.seconds()  # the stage's own time, which a rerun that reuses it reports too
        self.seconds[name] = time.time() - start if recorded is None else recorded
        self.ran.append(name)
        return ident.key

    def seconds_by_kind(self) -> dict[str, float | None]:
        """Total seconds per kind of stage (squeeze, recover, relabel, student), as first measured; None
        where a reused stage recorded no time (made by dsutil before stage times were kept)."""
        out: dict[str, float | None] = {}
        for name, s in self.seconds.items():
            kind = name.split()[0]
            out[kind] = None if s is None or (kind in out and out[kind] is None) else out.get(kind, 0.0) + s
        return out


def run_experiment(cfg: ExperimentConfig, out, progress: bool = True) -> dict:
    """Run (or reuse) squeeze, recover, relabel, students and analysis; write summary.json and figures."""
    out, start = Path(out), time.time()
    seeds = cfg.student_seeds()
    data = cfg.data.load()
    check_class_count(cfg, data.num_classes)  # before anything is written
    with claim(out, "dsutil run"), rank_log(out, cfg.to_dict()):  # one run at a time: a second one is refused
        return _run_experiment(cfg, out, data, seeds, start, progress)  # before it writes


def _run_experiment(cfg: ExperimentConfig, out: Path, data, seeds: list[int], start: float, progress: bool) -> dict:
    from .plots import demo_figures

    if is_main() and not (out / "config.json").exists():  # a run killed early still says how it was made; the
        write_json(out / "config.json", cfg.to_dict())  # settings of a rerun replace them once it has finished
    stages = Stages(progress)
    if progress and is_main():
        log.info(f"[dsutil] {describe(provenance(seeds))}")

    stages("squeeze", out / SQUEEZE_MARKER, squeeze_identity(data, cfg.teacher, cfg.teacher_checkpoint),
           lambda: squeeze(data, out, cfg.teacher, cfg.device, progress, cfg.teacher_checkpoint), own=made_from_teacher())
    teacher, spec, _, info = load_squeezed(out, resolve_device(cfg.device))  # the analyses run where the stages do
    check_teacher(info, data.classes, cfg.teacher_floor)
    methods: dict[str, dict] = {}
    for method in cfg.methods:
        rcfg = cfg.recover_config(method)
        rdir = ensure_recover(out, rcfg, cfg.device, progress, stages)
        store = ensure_labels(out, method, rcfg.ipc, cfg.relabel, cfg.device, progress, stages)
        images = ImageSet(rdir / "images.safetensors")  # streamed through the teacher in batches
        students, stored_images = [], image_bytes(rdir / "images.safetensors")
        for metric in cfg.prune_metrics:
            for ratio in cfg.prune_ratios:
                runs = [ensure_student(out, method, replace(cfg.student, prune_ratio=ratio, metric=metric, seed=seed),
                                       rcfg.ipc, cfg.device, data, progress, stages) for seed in seeds]
                point = {"prune_ratio": ratio, "metric": metric} | over_seeds(runs, seeds)
                students.append(point | {"total_bytes": stored_images + point["label_bytes"]})
        hard = [ensure_student(out, method, hard_label_config(cfg.student, seed), rcfg.ipc, cfg.device, data, progress,
                               stages) for seed in seeds] if cfg.baselines else None
        methods[method] = {"ipc": rcfg.ipc,
                           "within_class_cosine": streamed_within_class_cosine(feature_batches(teacher, images.batches())),
                           "teacher_top1_on_images": read_json(rdir / "recover.json")["teacher_top1_on_images"],
                           "label_bytes_full": LabelStore(store).kept_bytes(LabelStore(store).keys()),
                           "label_bytes_on_disk": LabelStore(store).disk_bytes(), "image_bytes": stored_images,
                           "students": students, "hard_label": hard and over_seeds(hard, seeds)}
    full_real = full_real_reference(info, cfg.student) if cfg.baselines else None
    add_label_robust_scores(methods, full_real)
    real_cos, real_count = real_within_class_cosine(teacher, data, cfg.cosine_per_class, cfg.data.seed)
    summary = {"name": cfg.name, "dataset": cfg.data.dataset, "classes": data.classes,
               "teacher": {"arch": spec["arch"], "test_top1": info["test_top1"]}, "full_real_hard_label": full_real,
               "real_within_class_cosine": real_cos, "real_within_class_cosine_images": real_count,
               "methods": methods, "settings": cfg.to_dict(), "environment": dsutil_environment(),
               "seeds": seeds, "provenance": provenance(seeds), "stages": {"ran": stages.ran, "reused": stages.reused},
               "stage_seconds": stages.seconds, "stage_seconds_by_kind": stages.seconds_by_kind(),
               "seconds": time.time() - start}
    if is_main():
        demo_figures(out, summary, data)
        summary["seconds"] = time.time() - start
        if read_json(out / "config.json") != json_ready(cfg.to_dict()):
            write_json(out / "config.json", cfg.to_dict())
        write_json(out / "summary.json", summary)
    barrier()
    return summary


def per_class_sample(targets: torch.Tensor, per_class: int | None, seed: int) -> list[int]:
    """The indices of at most ``per_class`` images of each class, drawn with a seed of their own (all, None)."""
    if per_class is None:
        return list(range(len(targets)))
    picked = []
    for c in targets.unique().tolist():
        idx = torch.nonzero(targets == c).flatten()
        gen = torch.Generator().manual_seed(derive_seed(seed, "cosine sample", c))
        picked += idx[torch.randperm(len(idx), generator=gen)[:per_class]].tolist()
    return sorted(picked)


def real_feature_batches(teacher, data, index: list[int], batch_size: int = 256):
    """``(features, labels)`` of the real training images ``index``, a batch at a time: decoded by loader
    workers, normalised and passed through the teacher on its device."""
    from torch.utils.data import DataLoader, Subset

    from .runtime import loader_options

    dev = next(teacher.parameters()).device
    loader = DataLoader(Subset(data.train, index), batch_size=batch_size, **loader_options(data.train, None, dev))
    return feature_batches(teacher, ((data.normalize(x.to(dev)), y) for x, y in loader))


def real_within_class_cosine(teacher, data, per_class: int | None, seed: int) -> tuple[float, int]:
    """The teacher's within-class cosine of the real training images (all, or a seeded sample per class) and
    the number of images it saw, streamed: the memory holds a batch and one feature sum per class, whatever
    the size of the training set."""
    from .data import train_targets

    idx = per_class_sample(train_targets(data.train), per_class, seed)
    return streamed_within_class_cosine(real_feature_batches(teacher, data, idx)), len(idx)


def check_class_count(cfg: ExperimentConfig, num_classes: int) -> None:
    """Settings bounded by the data's class count, checked once the data is known, before the teacher trains."""
    from .settings import require

    require(cfg.relabel.topk is None or cfg.relabel.topk <= num_classes, "relabel.topk", cfg.relabel.topk,
            f"at most the data's {num_classes} classes")
    for k in cfg.frontier.topk if cfg.frontier else []:
        require(k is None or k <= num_classes, "frontier.topk", k, f"at most the data's {num_classes} classes")


def check_teacher(squeezed: dict, classes: list[str], floor: float) -> None:
    """A teacher near chance on the run's real test images (measured by squeeze, in the run's class order) stops the
    run before any image is recovered from it: such a teacher knows other classes, or other pixels."""
    top1, chance = squeezed["test_top1"], 1 / len(classes)
    if top1 < floor * chance:
        raise ValueError(
            f"the teacher's test top-1 on this run's real images is {top1:.1%}, under {floor:g} x chance ({chance:.1%} "
            f"for {len(classes)} classes): it does not know these classes as the run orders them. Likely causes: its "
            f"classes are in another order (the run's are {', '.join(classes[:3])}, ...), the images are "
            "normalised otherwise than it was trained on (data.normalize; import-teacher --normalize), or it was "
            "trained at another input size (data.image_size). A teacher this weak by design: --set teacher_floor=0")


def over_seeds(runs: list[dict], seeds: list[int]) -> dict:
    """One student setting over its seeds: mean, sample std (None for one seed) and per-seed values."""
    out = {"seeds": seeds, "label_bytes": round(sum(r["label_bytes"] for r in runs) / len(runs))}
    for key in ("test_top1", "test_top5", "test_ece"):
        values = [r[key] for r in runs]
        mean = sum(values) / len(values)
        std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else None
        out |= {key: mean, f"{key}_std": std, f"{key}_per_seed": values}
    return out


def summary_table(summary: dict) -> str:
    """A short terminal table: cosine, the hard-label baseline, then top-1 (mean +- std over seeds) at each pruning
    ratio, per method; then DD-Ranking's LRS where the baselines were trained."""
    ratios = [s["prune_ratio"] for s in next(iter(summary["methods"].values()))["students"]]
    seeds = summary.get("seeds", [0])
    width = 8 if len(seeds) == 1 else 11
    pct = lambda r: "n/a" if r is None else f"{r['test_top1'] * 100:.1f}%" + (  # noqa: E731
        "" if r.get("test_top1_std") is None else f"±{r['test_top1_std'] * 100:.1f}")
    hard = any(m.get("hard_label") for m in summary["methods"].values())
    head = f"{'method':<8} {'cosine':>7} " + (f"{'hard':>{width}} " if hard else "") + \
        " ".join(f"{'r=' + format(r, 'g'):>{width}}" for r in ratios)
    real = summary.get("real_within_class_cosine")
    lines = [f"teacher {summary['teacher']['arch']}: test top-1 {summary['teacher']['test_top1']:.4f}; "
             "real images within-class cosine " + ("not measured (a run made before it was streamed)"
                                                   if real is None else f"{real:.3f}"), head]
    for name, m in summary["methods"].items():
        cosine = "n/a" if m["within_class_cosine"] is None else f"{m['within_class_cosine']:.3f}"
        cells = ([pct(m["hard_label"])] if hard else []) + [pct(s) for s in m["students"]]
        lines.append(f"{name:<8} {cosine:>7} " + " ".join(f"{c:>{width}}" for c in cells))
    if any(m["within_class_cosine"] is None for m in summary["methods"].values()):
        lines.append("cosine n/a: one image per class (IPC 1) has no pair to compare")
    full = next(iter(summary["methods"].values()))["label_bytes_full"]
    over = f", mean ± std over seeds {seeds}" if len(seeds) > 1 else f", seed {seeds[0]}"
    lines.append(f"student test top-1 by label pruning ratio r{over} (labels kept: 1 - r of {full} bytes)"
                 + ("; hard: the same images on one-hot labels" if hard else ""))
    scored = {n: m for n, m in summary["methods"].items() if n != "real" and any(s.get("scores") for s in m["students"])}
    if scored:
        ref = summary["full_real_hard_label"]
        lines.append(f"whole real training set, hard labels: {ref['test_top1'] * 100:.1f}% ({ref['from']}: "
                     f"{'the' if ref['same_architecture'] else 'not the'} students' architecture; recipe {ref['recipe']})")
        lines.append(f"{'LRS x100':<16} " + " ".join(f"{'r=' + format(r, 'g'):>{width}}" for r in ratios))
        for name, m in scored.items():
            cells = ["n/a" if s.get("scores") is None else f"{s['scores']['lrs'] * 100:.1f}" for s in m["students"]]
            lines.append(f"{name:<16} " + " ".join(f"{c:>{width}}" for c in cells))
        lines.append("LRS: DD-Ranking's label-robust score of the seeds' mean top-1s, in [0, 100], higher is better "
                     "(docs/protocol.md)")
    return "\n".join(lines)


def finished_summary(cfg: ExperimentConfig, out) -> dict | None:
    """``summary.json`` of ``out`` when it was written for these settings (the frontier section aside, which the
    run does not read), else None."""
    path = Path(out) / "summary.json"
    if not (path.exists() and (Path(out) / SQUEEZE_MARKER).exists()):
        return None
    summary = read_json(path)
    run_settings = lambda d: {k: v for k, v in json_ready(d or {}).items() if k != "frontier"}  # noqa: E731
    return summary if run_settings(summary.get("settings")) == run_settings(cfg.to_dict()) else None


def ensure_run(cfg: ExperimentConfig, out, progress: bool = True) -> dict:
    """The run's summary: ``summary.json`` when it was written for these settings, else ``run_experiment``
    (which itself reuses every finished stage). For notebooks that only read a run."""
    return finished_summary(cfg, out) or run_experiment(cfg, out, progress)


def ensure_labels(run_dir, method: str, ipc: int, lcfg, device: str = "auto", progress: bool = True,
                  stages: Stages | None = None) -> Path:
    """The label store of ``method``'s images made with relabel settings ``lcfg`` (relabelled when missing
    or made with other settings or images)."""
    run_dir, stages = Path(run_dir), stages or Stages(progress)
    rdir, store = recover_dir(run_dir, method, ipc), label_store_dir(run_dir, method, ipc, lcfg.topk, lcfg.topk_fill)
    stages(f"relabel {store.name}", store / MARKER, relabel_identity(run_dir, rdir, lcfg),
           lambda: relabel(run_dir, rdir, lcfg, out=store, device=device, progress=progress), own=STORE_FILES)
    return store


def ensure_recover(run_dir, rcfg, device: str = "auto", progress: bool = True, stages: Stages | None = None) -> Path:
    """Recover ``rcfg.method`` into the run unless done with these settings; returns its folder.

    Notebooks use it for extra methods (the ablations), which are then cached like the preset's."""
    run_dir, stages = Path(run_dir), stages or Stages(progress)
    rdir = recover_dir(run_dir, rcfg.method, rcfg.ipc)
    check_not_imported(rdir, rcfg.method)
    stages(f"recover {rcfg.method}", rdir / MARKER, recover_identity(run_dir, rcfg),
           lambda: recover(run_dir, rcfg, device=device, progress=progress), own=RECOVER_FILES)
    return rdir


def check_not_imported(rdir: Path, method: str) -> None:
    """A set imported under the name a method's set would take is the user's: never replaced by a run."""
    from .import_set import imported

    if imported(rdir):
        raise ValueError(f"{rdir} holds a set imported by `dsutil import`, where the run would recover {method}'s "
                         "set: import it under another --name, or run into another folder; dsutil run never replaces "
                         "an imported set")


def ensure_student(run_dir, method: str, scfg, ipc: int, device: str = "auto", data=None, progress: bool = True,
                   stages: Stages | None = None, store: Path | None = None, folder: Path | None = None) -> dict:
    """``train.json`` (plus ``dir``) of a student on the run's label store of ``method`` (or ``store``):
    reused when it was trained with these settings on the current labels, else trained now. Pruning by
    training dynamics first ensures the full-label student of the same settings and takes its scores."""
    run_dir, stages = Path(run_dir), stages or Stages(progress)
    if scfg.metric in DYNAMICS_METRICS and scfg.scores_from is None:
        full = replace(scfg, prune_ratio=0.0, metric="random", draw="cycle")  # every stored batch in turn
        reference = ensure_student(run_dir, method, full, ipc, device, data, progress, stages, store)
        if not (Path(reference["dir"]) / "dynamics.safetensors").exists():  # trained before students kept them
            if is_main():
                remove_own(reference["dir"], (*STUDENT_FILES, MARKER))
            barrier()
            reference = ensure_student(run_dir, method, full, ipc, device, data, progress, stages, store)
        scfg = replace(scfg, scores_from=reference["dir"])
    store = store or label_store_dir(run_dir, method, ipc)
    sdir = folder or student_dir(run_dir, method, ipc, scfg)
    stages(f"student {sdir.name}", sdir / MARKER, student_identity(store, scfg),
           lambda: train_student(run_dir, store, scfg, sdir, device, progress=progress, data=data), own=STUDENT_FILES)
    return read_json(sdir / "train.json") | {"dir": str(sdir)}
