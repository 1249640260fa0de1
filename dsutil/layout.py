"""The names inside a run folder, in one place: what each stage writes there. A stage's ``--restart`` and the
runner's stage cache remove exactly these (a user's own files stay), and every module finds a run's parts here.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import fields
from pathlib import Path

MARKER = "stage.json"  # a stage folder's marker (dsutil.stage): its key, and whether it is finished
SQUEEZE_MARKER = "squeeze.stage.json"  # squeeze's, whose folder is the run
OLDER = ("settings.json", "pending.json")  # what an older dsutil kept there in its place (recover's, relabel's)
SQUEEZE_FILES = ("teacher.safetensors", "bn_stats.safetensors", "squeeze.json", "teacher_metrics.jsonl")
RECOVER_FILES = ("recover.json", "images.safetensors", "units/*.safetensors", "png/*/*.png", OLDER[0])
TIMING = "timing.json"  # how long a relabel took: kept out of the manifest, which a student's key reads
STORE_FILES = ("manifest.json", TIMING, "epoch*.safetensors", OLDER[1])  # a label store
STUDENT_FILES = ("train.json", "student.safetensors", "metrics.jsonl", "dynamics.safetensors", "checkpoint.pt")
# what a finished stage's marker records and a reuse checks: the files later stages read (not the PNG copies of a set,
# nor a student's checkpoint, which it removes)
SQUEEZE_OUTPUTS = SQUEEZE_FILES
RECOVER_OUTPUTS = ("recover.json", "images.safetensors")
STORE_OUTPUTS = ("manifest.json", "epoch*.safetensors")
STUDENT_OUTPUTS = ("train.json", "student.safetensors", "metrics.jsonl", "dynamics.safetensors")


DEMO_FIGURES = ("within_class_cosine.png", "accuracy_vs_pruning.png", "accuracy_vs_label_storage.png",
                "accuracy_vs_total_storage.png", "images_*.png")
# the run's figures (dsutil.plots.demo_figures); a notebook's own are named <preset>_<figure>.png and left alone


def made_from_teacher() -> tuple[str, ...]:
    """Every file a run holds that came from its teacher, as glob patterns under the run: what squeeze's
    ``restart`` removes with the teacher (and nothing else)."""
    return (*SQUEEZE_FILES, "summary.json", "frontier.json", "*.stage.json", "**/stage.json",
            *(f"figures/{f}" for f in DEMO_FIGURES), *(f"recover/*/{f}" for f in RECOVER_FILES), *(f"labels/*/{f}" for f in STORE_FILES),
            *(f"{d}/*/{f}" for d in ("students", "frontier") for f in STUDENT_FILES))


def recover_dir(run_dir, method: str, ipc: int) -> Path:
    """A distilled set of the run: ``recover/<method>-ipc<N>``."""
    return Path(run_dir) / "recover" / f"{method}-ipc{ipc}"


def label_store_dir(run_dir, method: str, ipc: int, topk: int | None = None, topk_fill: str = "zero") -> Path:
    """The runner's label store of a set: ``labels/<method>-ipc<N>[-k<K>-<fill>]``."""
    return Path(run_dir) / "labels" / (f"{method}-ipc{ipc}" + (f"-k{topk}-{topk_fill}" if topk else ""))


def relabel_store_dir(run_dir, images_dir, cfg) -> Path:
    """The store of ``dsutil relabel`` without ``--out``: ``labels/<images>-e<E>-b<B>-<mix>[-r..][-k..]``."""
    name = f"{Path(images_dir).name}-e{cfg.epochs}-b{cfg.batch_size}-{cfg.mix}"
    if cfg.prune_ratio:
        name += f"-r{cfg.prune_ratio:g}" + ("" if cfg.prune_pool == "uniform" else f"-{cfg.prune_pool}")
    if cfg.topk:
        name += f"-k{cfg.topk}-{cfg.topk_fill}" + (f"-t{cfg.topk_temperature:g}" if cfg.topk_fill == "probs" else "")
    return Path(run_dir) / "labels" / name


def others_hash(cfg, named: tuple[str, ...]) -> str:
    """``-<8 hex>`` of every setting outside ``named`` that differs from the dataclass's defaults ("" if none),
    so that folders of other settings never share a name while the defaults keep their short, old names."""
    default = type(cfg)()
    others = {f.name: getattr(cfg, f.name) for f in fields(cfg)
              if f.name not in named and getattr(cfg, f.name) != getattr(default, f.name)}
    return "-" + hashlib.sha256(json.dumps(others, sort_keys=True, default=str).encode()).hexdigest()[:8] if others else ""


def student_dir(run_dir, method: str, ipc: int, scfg) -> Path:
    """The runner's student: ``students/<method>-ipc<N>-<metric>-r<r>[-granularity][-pool][-draw][-s<seed>][-hash]``,
    or ``students/<method>-ipc<N>-hard[-s<seed>][-hash]`` for one trained on hard labels only."""
    suffix = ("" if scfg.granularity == "batch" else f"-{scfg.granularity}") + \
        ("" if scfg.pool == "uniform" else f"-{scfg.pool}") + ("" if scfg.draw == "cycle" else f"-{scfg.draw}") + \
        (f"-s{scfg.seed}" if scfg.seed else "")
    named = ("metric", "prune_ratio", "granularity", "pool", "draw", "seed", "scores_from")
    if scfg.hard_epochs == 1:  # one-hot labels only (the hard-label baseline): no stored label, ratio or pool
        seed = f"-s{scfg.seed}" if scfg.seed else ""
        return Path(run_dir) / "students" / f"{method}-ipc{ipc}-hard{seed}{others_hash(scfg, (*named, 'hard_epochs'))}"
    return Path(run_dir) / "students" / f"{method}-ipc{ipc}-{scfg.metric}-r{scfg.prune_ratio:g}{suffix}{others_hash(scfg, named)}"


def trained_student_dir(run_dir, labels, scfg) -> Path:
    """The student of ``dsutil train`` without ``--out``: ``students/<labels>-<arch>-r<r>-<metric>-<granularity>
    [-online][-hash]``."""
    name = f"{Path(labels).name}-{scfg.arch}-r{scfg.prune_ratio:g}-{scfg.metric}-{scfg.granularity}"
    named = ("arch", "prune_ratio", "metric", "granularity", "online")
    return Path(run_dir) / "students" / (name + ("-online" if scfg.online else "") + others_hash(scfg, named))


def frontier_student_dir(run_dir, method: str, ipc: int, topk: int | None, prune_ratio: float, policy: str,
                         seed: int) -> Path:
    """A student of the frontier grid: ``frontier/<method>-ipc<N>-k<K|all>-r<r>-<policy>-s<seed>``."""
    return Path(run_dir) / "frontier" / f"{method}-ipc{ipc}-k{topk or 'all'}-r{prune_ratio:g}-{policy}-s{seed}"
