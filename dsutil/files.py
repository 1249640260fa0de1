"""Writing results safely: atomic files, JSON settings, safetensors tensors and models.

Every file a stage writes goes through a temporary file in the same folder
and an ``os.replace``, so a crash never leaves a half-written result that a
rerun would mistake for a finished one. Tensors are stored as safetensors,
which cannot run code when loaded.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

METADATA_KEY = "dsutil"  # the one safetensors header entry that holds a file's metadata, as JSON


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path next to ``path``; rename it onto ``path`` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp (and safetensors) make 0600; results are ordinary files
        os.replace(tmp, path)
    except OSError as e:  # a full disk, say: one message naming the file meant, not the temporary one
        if e.filename in (None, tmp) and e.errno is not None:
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")


def write_jsonl(path, rows: list[dict]) -> None:
    """One JSON object per line (per-epoch metrics), rewritten whole and atomically: a crash keeps the last
    complete file."""
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(row, default=str) + "\n" for row in rows))


TENSORBOARD_ENV = "DSUTIL_TENSORBOARD"  # a folder: training loops mirror their per-epoch metrics there
_tensorboard: dict = {}  # the one open writer (loops run one at a time): its metrics file -> SummaryWriter


def check_tensorboard() -> None:
    """Before any work: when ``DSUTIL_TENSORBOARD`` is set, it names a folder (or none yet) and TensorBoard
    is importable."""
    root = os.environ.get(TENSORBOARD_ENV)
    if root and Path(root).exists() and not Path(root).is_dir():
        raise ValueError(f"{TENSORBOARD_ENV}={root} is a file; expected a folder for TensorBoard logs")
    if root:
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError as e:
            raise ValueError(f"{TENSORBOARD_ENV}={os.environ[TENSORBOARD_ENV]} asks for TensorBoard logs, but "
                               f"tensorboard is not installed (pip install tensorboard): {e}") from None


def write_metrics(path, history: list[dict]) -> None:
    """A training loop's per-epoch metrics: ``path`` (JSON lines, the record) and, when ``DSUTIL_TENSORBOARD``
    names a folder, the newest epoch's numbers as TensorBoard scalars under FOLDER/<path's folder>/<path's
    stem>, so a long run can be watched live with ``tensorboard --logdir FOLDER``."""
    write_jsonl(path, history)
    root = os.environ.get(TENSORBOARD_ENV)
    if not root or not history:
        return
    from torch.utils.tensorboard import SummaryWriter

    path = Path(path).resolve()
    if path not in _tensorboard:  # another loop's: close its writer (files, thread) before opening this one's
        for old in _tensorboard.values():
            old.close()
        _tensorboard.clear()
        _tensorboard[path] = SummaryWriter(str(Path(root) / path.parent.name / path.stem))
    writer, row = _tensorboard[path], history[-1]
    for key, value in row.items():
        if key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool):
            writer.add_scalar(key, value, row["epoch"])
    writer.flush()


def file_sha256(path, chunk: int = 1 << 20) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def json_ready(obj):
    """Round-trip through JSON so tuples and lists compare equal."""
    return json.loads(json.dumps(obj, default=str))


def read_json(path) -> dict:
    """A JSON object we wrote; a damaged one, or one that holds anything but an object, names itself."""
    try:
        obj = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); was it truncated or edited by hand?") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a JSON {type(obj).__name__.replace('dict', 'object')}; expected an object "
                         "(was it edited by hand?)")
    return obj


def save_tensors(path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    """Save tensors atomically; ``metadata`` goes into the header as one JSON object with sorted keys.

    One header key, not one per entry: safetensors writes its metadata map in a random order, so
    several keys would give different bytes for the same content (and a new sha256 on every rerun).
    """
    meta = {METADATA_KEY: json.dumps(metadata, sort_keys=True)} if metadata else None
    with atomic_path(path) as tmp:
        try:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=meta)
        except Exception as e:  # safetensors reports a failed write (a full disk) as its own error type
            if type(e).__name__ != "SafetensorError":
                raise
            code = re.search(r"os error (\d+)", str(e))
            errno = int(code.group(1)) if code else 5  # EIO
            raise OSError(errno, f"{os.strerror(errno)} (while writing tensors)", str(path)) from None


def load_tensors(path, device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """Load tensors and their JSON metadata; a missing or damaged file names itself."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
        meta = meta[METADATA_KEY] if set(meta) == {METADATA_KEY} else meta  # else: an older file, one entry per key
        return load_file(str(path), device=str(device)), meta
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"{path} is not a readable safetensors file ({e})") from e


def save_model(path, model: torch.nn.Module, spec: dict) -> None:
    """Save a model's weights with the ``build_model`` arguments that rebuild it."""
    save_tensors(path, model.state_dict(), {"model": spec})


def load_model(path, device: str = "cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild a model saved by ``save_model``; returns it in eval mode with its spec."""
    from .models import build_model

    state, meta = load_tensors(path, device)
    if "model" not in meta:
        raise ValueError(f"{path} has no model spec in its metadata; was it written by dsutil?")
    try:
        model = build_model(**meta["model"]).to(device)
        model.load_state_dict(state)
    except (TypeError, ValueError, RuntimeError) as e:  # a spec or weights that do not make a model
        raise ValueError(f"{path} does not hold a dsutil model: {e}") from e
    return model.eval(), meta["model"]


TEMPORARY = ".*.tmp"  # what atomic_path leaves when a process dies inside it


def remove_own(folder, patterns) -> None:
    """Remove the files of ``folder`` that dsutil writes there (glob ``patterns``, its temporary files too) and
    the folders left empty; every other file stays."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for pattern in (*patterns, TEMPORARY, f"**/{TEMPORARY}"):
        for path in folder.glob(pattern):
            if path.is_file() or path.is_symlink():
                path.unlink()
    for sub in sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        if not any(sub.iterdir()):
            sub.rmdir()


LOCK = ".dsutil.lock"  # in a folder one dsutil process is writing: its pid, host and command
_held: set[Path] = set()  # the folders this process holds


def _holder(lock: Path) -> dict:
    """What a lock file says of its writer; {} when it is being written this instant, damaged, or holds
    anything but the object dsutil writes (a live writer until shown otherwise)."""
    try:
        holder = json.loads(lock.read_text() or "{}")
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _holder_gone(holder: dict) -> bool:
    """A lock's writer is known to be gone only on this host, by its pid (a pid no process can have is gone)."""
    import socket

    if holder.get("host") != socket.gethostname():
        return False
    pid = holder.get("pid")
    if type(pid) is not int:
        return False
    if not 0 < pid < 2**22:  # above Linux's pid_max: no process has it
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):
        return False
    return False


def _refusal(folder: Path, lock: Path, holder: dict, what: str) -> ValueError:
    return ValueError(f"{folder} is being written by another dsutil process ({what}: pid {holder.get('pid', '?')} on "
                      f"{holder.get('host', '?')}, lock {lock}); wait for it to finish, or remove the lock file if that "
                      "process is gone")


def _check_enclosing(folder: Path, what: str) -> None:
    """A folder inside one another live process holds (a run being written by ``dsutil run``) is refused too."""
    for d in folder.resolve().parents:
        lock = d / LOCK
        if d not in _held and lock.exists():
            holder = _holder(lock)
            if not (holder and _holder_gone(holder)):
                raise _refusal(d, lock, holder, what)


@contextmanager
def claim(folder, what: str):
    """Hold ``folder`` for one writer: an exclusive lock file made atomically (``O_EXCL``), removed on exit.
    A second writer is refused at once, saying who holds it, and so is a writer of a folder inside one that
    another process holds; a lock whose process is gone (same host, pid not running) is stale and taken over.
    Under torchrun only rank 0 calls this."""
    import socket
    import sys

    from .runtime import is_main

    folder = Path(folder)
    if not is_main() or folder.resolve() in _held:  # the other ranks; a stage inside a run this process holds
        yield
        return
    _check_enclosing(folder, what)
    created = [d for d in (folder, *folder.parents) if not d.exists()]  # made here, removed again if left empty
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK
    me = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv[:4])}
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _holder(lock)
            if holder and _holder_gone(holder):
                lock.unlink(missing_ok=True)
                continue
            raise _refusal(folder, lock, holder, what) from None
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(me))
        break
    else:
        raise ValueError(f"{folder}: could not take the lock {lock}; remove it if no dsutil process is writing there")
    _held.add(folder.resolve())
    try:
        yield
    finally:
        _held.discard(folder.resolve())
        lock.unlink(missing_ok=True)
        for d in created:  # refused before it wrote anything: leave no trace
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()
