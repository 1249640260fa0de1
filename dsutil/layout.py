"""The names inside a run folder, in one place: what each stage writes there. A stage's ``--restart`` and the
runner's stage cache remove exactly these (a user's own files stay), and every module finds a run's parts here.
"""
from __future__ import annotations

from pathlib import Path

SQUEEZE_FILES = ("teacher.safetensors", "bn_stats.safetensors", "squeeze.json", "teacher_metrics.jsonl")
RECOVER_FILES = ("settings.json", "recover.json", "images.safetensors", "units/*.safetensors", "png/*/*.png")
PENDING = "pending.json"  # a relabel's inputs and settings while its store is unfinished
TIMING = "timing.json"  # how long a relabel took: kept out of the manifest, which training fingerprints
STORE_FILES = ("manifest.json", PENDING, TIMING, "epoch*.safetensors")  # a label store
STUDENT_FILES = ("train.json", "student.safetensors", "metrics.jsonl", "dynamics.safetensors", "checkpoint.pt")


def made_from_teacher() -> tuple[str, ...]:
    """Every file a run holds that came from its teacher, as glob patterns under the run: what squeeze's
    ``restart`` removes with the teacher (and nothing else)."""
    return (*SQUEEZE_FILES, "summary.json", "frontier.json", "*.stage.json", "**/stage.json",
            "figures/*.png", *(f"recover/*/{f}" for f in RECOVER_FILES), *(f"labels/*/{f}" for f in STORE_FILES),
            *(f"{d}/*/{f}" for d in ("students", "frontier") for f in STUDENT_FILES))


def recover_dir(run_dir, method: str, ipc: int) -> Path:
    """A distilled set of the run: ``recover/<method>-ipc<N>``."""
    return Path(run_dir) / "recover" / f"{method}-ipc{ipc}"


def label_store_dir(run_dir, method: str, ipc: int, topk: int | None = None, topk_fill: str = "zero") -> Path:
    """The runner's label store of a set: ``labels/<method>-ipc<N>[-k<K>-<fill>]``."""
    return Path(run_dir) / "labels" / (f"{method}-ipc{ipc}" + (f"-k{topk}-{topk_fill}" if topk else ""))
