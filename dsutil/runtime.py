"""Device choice, seeding and the process's place among torchrun ranks, in one place so every stage does
them alike.

Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) :func:`start_ranks` joins the process group once
(NCCL on GPUs, gloo on the CPU) and each process takes GPU ``LOCAL_RANK``; everywhere else ``rank() == 0``
and ``world_size() == 1``, so the same code runs as one plain process.
"""
from __future__ import annotations

import ctypes
import logging
import os
import random
import sys
import time
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

RANK_TIMEOUT = timedelta(minutes=30)  # how long a rank waits for the others: every stage splits its work, so a
# rank that waits this long is stuck (rank 0 alone writes a recovered set's PNGs, minutes at ImageNet size)


def fix_mmap_threshold() -> None:
    """With ``DSUTIL_MMAP_THRESHOLD=BYTES`` (1048576 is a good value), blocks of that size and more get their
    own mmap for the whole run. glibc does so only until a large block is freed, then raises its threshold, and
    batch-sized tensors come from a heap that fragments: relabel's peak memory over 20,000 images varied from
    0.9 to 3.6 GB between identical runs, 1.06 GB every time with the threshold fixed. The price is time (the
    pages are faulted in afresh each step): 4-14% for relabel, 15-34% for training on this CPU
    (benchmarks/README.md, Scale), so it is off unless asked for. The ``dsutil`` command calls this first; it
    does nothing where the C library has no glibc ``mallopt``."""
    text = os.environ.get("DSUTIL_MMAP_THRESHOLD", "0")
    if not text.isdigit():
        raise ValueError(f"DSUTIL_MMAP_THRESHOLD={text!r}: expected a number of bytes (1048576), or 0 for glibc's own")
    value = int(text)
    if value > 0 and sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None).mallopt(-3, value)  # M_MMAP_THRESHOLD
        except (OSError, AttributeError):
            pass


RENDEZVOUS_ENV = "DSUTIL_RENDEZVOUS_SECONDS"  # how long ranks wait to find each other at the start
RENDEZVOUS_SECONDS = 120  # under a launcher dsutil knows (torchrun, SLURM, MPI)
UNLAUNCHED_SECONDS = 1  # under none: a rank environment left over in a job script or a notebook, most likely
LAUNCHERS = ("TORCHELASTIC_RUN_ID", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK")  # what each one sets


def _int_env(name: str, low: int, high: int | None, expected: str, default: str | None = None) -> int:
    """An integer environment variable, checked; its message names it."""
    text = os.environ.get(name, default)
    if text is None or not text.strip().isdigit() or int(text) < low or (high is not None and int(text) > high):
        raise ValueError(f"{name}={text!r}: expected {expected}")
    return int(text)


def start_ranks() -> None:
    """Join torchrun's process group when launched by it with several processes; idempotent.

    A rank environment left over without a launcher (WORLD_SIZE > 1 in a copied job script or a notebook, with
    none of the variables a launcher sets, ``LAUNCHERS``) fails within ``UNLAUNCHED_SECONDS``, saying so, instead
    of waiting for peers that never come; under a launcher the ranks wait ``DSUTIL_RENDEZVOUS_SECONDS`` (120)."""
    world = _int_env("WORLD_SIZE", 1, None, "the number of torchrun ranks (1 or more)", "1")
    if world == 1 or dist.is_initialized():
        return
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise ValueError(f"WORLD_SIZE={world} asks for {world} torchrun ranks, but {', '.join(missing)} "
                         f"{'is' if len(missing) == 1 else 'are'} not set: launch with torchrun, or unset WORLD_SIZE "
                         "to run as one process")
    me = _int_env("RANK", 0, world - 1, f"this process's rank, 0 to {world - 1} (WORLD_SIZE={world})")
    port = _int_env("MASTER_PORT", 1, 65535, "a TCP port, 1 to 65535")
    launched = any(os.environ.get(k) for k in LAUNCHERS)
    wait = _int_env(RENDEZVOUS_ENV, 1, None, "whole seconds, 1 or more",
                    str(RENDEZVOUS_SECONDS if launched else UNLAUNCHED_SECONDS))
    host = os.environ["MASTER_ADDR"]
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # torchrun's agent already serves the store
    try:
        store = dist.TCPStore(host, port, world, is_master=me == 0 and not agent, timeout=timedelta(seconds=wait),
                              wait_for_workers=True)
        store.set(f"dsutil/rank{me}", "here")  # a client that found the store but no master peer fails here
        for r in range(world):
            store.wait([f"dsutil/rank{r}"])
    except (RuntimeError, dist.DistError) as e:
        alone = "" if launched else (f"; no launcher's variables are set ({', '.join(LAUNCHERS)}), so the wait was "
                                     f"{wait} s: ranks started by hand set {RENDEZVOUS_ENV}")
        raise ValueError(f"rank {me} of WORLD_SIZE={world} found no peers at {host}:{port} within {wait} s "
                         f"({str(e).splitlines()[0]}); launch with torchrun, unset WORLD_SIZE to run as one process, "
                         f"or raise {RENDEZVOUS_ENV}{alone}") from None
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo", store=store, rank=me, world_size=world, timeout=RANK_TIMEOUT)


def stop_ranks() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """Rank 0 (or a plain process): the one that prints progress and writes shared files."""
    return rank() == 0


log = logging.getLogger("dsutil")  # what dsutil says while it works; shown by show_log (the CLI, the notebooks)


class _MainRank(logging.Filter):
    """Only rank 0 speaks: under torchrun the other ranks' records are dropped."""

    def filter(self, record) -> bool:
        return is_main()


class _Stdout(logging.StreamHandler):
    """Writes to sys.stdout as it is when a record comes (a notebook's, pytest's capture), not as it was."""

    stream = property(lambda self: sys.stdout, lambda self, value: None)


def show_log() -> None:
    """dsutil's messages as plain lines on stdout, from rank 0 only (once per process; a library that imports
    dsutil and never calls it sees nothing)."""
    if not any(isinstance(h, _Stdout) for h in log.handlers):
        handler = _Stdout()
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.addFilter(_MainRank())
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


@contextmanager
def rank_log(folder: Path, settings: dict):
    """While a run works, each rank appends what dsutil says to ``folder/logs/rank<R>.log``, below a header of
    the date, the command line and the settings: what a person reads after a job on a cluster ended."""
    import json
    import shlex

    path = Path(folder) / "logs" / f"rank{rank()}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S %z')} rank {rank()} of {world_size()}: "
                f"{shlex.join(sys.argv)}\n# settings: {json.dumps(settings, sort_keys=True, default=str)}\n")
    level = log.level
    log.addHandler(handler)
    log.setLevel(min(level or logging.INFO, logging.INFO))
    try:
        yield path
    except BaseException as e:  # the reason the run stopped ends its part of the log
        handler.stream.write(f"# stopped: {type(e).__name__}: {e}\n")
        raise
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
        handler.close()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _wire(t: torch.Tensor) -> torch.Tensor:
    """``t`` where the process group can send it (NCCL only moves GPU tensors)."""
    return t.cuda() if dist.get_backend() == "nccl" else t


def sum_over_ranks(tensors: list[torch.Tensor]) -> None:
    """Sum each tensor over the ranks, in place (float64 sums stay float64)."""
    if dist.is_initialized():
        for t in tensors:
            sent = _wire(t)
            dist.all_reduce(sent)
            t.copy_(sent)


def my_rows(n: int) -> slice:
    """This rank's rows of an n-row batch: every world_size-th from its rank (all of them in one process)."""
    return slice(rank(), n, world_size())


def gather_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """The whole n-row batch on every rank, from each rank's rows (``t`` = rows :func:`my_rows` of it)."""
    w = world_size()
    if w == 1:
        return t
    padded = _wire(torch.zeros(-(-n // w), *t.shape[1:], dtype=t.dtype))
    padded[:len(t)] = t
    parts = [torch.empty_like(padded) for _ in range(w)]
    dist.all_gather(parts, padded)
    whole = torch.empty(n, *t.shape[1:], dtype=t.dtype, device=t.device)
    for r, part in enumerate(parts):
        whole[r::w] = part[:len(range(r, n, w))].to(t.device)
    return whole


def my_share(items: list) -> list:
    """This rank's items of a list split across the ranks: every world_size-th, starting at its rank."""
    return items[rank()::world_size()]


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present (under torchrun: GPU LOCAL_RANK), else the CPU; never assumes CUDA."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but this PyTorch sees no CUDA GPU; use --device cpu")
    if device == "cuda" and dist.is_initialized():
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return torch.device(device)


def loader_workers(requested: int | None = None) -> int:
    """DataLoader worker processes: as asked, but never more than the cores this process may use; None
    leaves one core to the main process (at most 8 workers; 0 on a single core)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if requested is None:
        return min(8, cores - 1)
    if requested < 0:
        raise ValueError(f"workers must be 0 or more, got {requested}")
    return min(requested, cores)


def loader_options(dataset, workers: int | None, device, epochs: int = 1) -> dict:
    """DataLoader keywords: worker processes for datasets that decode files (``workers=None``: as
    :func:`loader_workers` allows; in-memory datasets get none, they have nothing to decode), pinned memory
    when batches go to a GPU, and workers kept alive across epochs."""
    if workers is None and not getattr(dataset, "decodes_files", False):
        workers = 0
    workers = loader_workers(workers)
    return {"num_workers": workers, "pin_memory": torch.device(device).type == "cuda",
            "persistent_workers": workers > 0 and epochs > 1}


class LoaderWait:
    """Iterate a loader and add up the seconds spent waiting for its next batch: an upper bound on the time the
    device sat idle for want of data (recorded by relabel and training as ``loader_wait_seconds``)."""

    def __init__(self, loader):
        self.loader, self.seconds = loader, 0.0

    def __iter__(self):
        batches = iter(self.loader)
        while True:
            start = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                return
            self.seconds += time.perf_counter() - start
            yield batch


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def derive_seed(seed: int, *keys) -> int:
    """A seed for one unit of work, fixed by the run seed and the unit's keys."""
    import hashlib

    h = hashlib.sha256(repr((seed, *keys)).encode()).digest()
    return int.from_bytes(h[:8], "little") & (2**63 - 1)


def dsutil_environment() -> dict[str, str]:
    """The ``DSUTIL_*`` variables this process sees (cache, memory, rendezvous, TensorBoard): settings that live
    in the environment, written with a run's results so that it says how it was made."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith("DSUTIL_")}
