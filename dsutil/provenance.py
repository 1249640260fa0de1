"""Where a result was made: the code (dsutil's version and commit), the software and the machine, and when.

A number that does not come back is most often one made by other code or another CPU's vector kernels; every stage
marker and run summary records this, so that the two can be told apart from the files alone.
"""
from __future__ import annotations

import datetime
import functools
import platform
import subprocess
from pathlib import Path

# the CPU flags that decide which of torch's vector kernels run (and so the last bits of a float sum)
VECTOR_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "neon", "asimd")


def provenance(seeds: list[int] | None = None) -> dict:
    """The code, software and machine of this process, the date, and the ``seeds`` given (a stage's own seeds are
    in its settings)."""
    return machine() | {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")} | \
        ({"seeds": list(seeds)} if seeds is not None else {})


@functools.lru_cache(maxsize=1)
def machine() -> dict:
    import torch

    from . import __version__

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"dsutil": __version__, **checkout(Path(__file__).resolve().parent.parent), "python": platform.python_version(),
            "torch": torch.__version__, "cpu": cpu_model(), "cpu_vector": cpu_vector(),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(), "gpu": gpu,
            "platform": platform.platform()}


def checkout(root: Path) -> dict:
    """``commit`` and ``dirty`` (tracked files changed) when dsutil runs from a git checkout; nulls otherwise
    (an installed wheel)."""
    def git(*args) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD") if (root / ".git").exists() else None
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def cpu_model() -> str:
    for line in _cpuinfo():
        if line.split(":")[0].strip() in ("model name", "Model"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_vector() -> list[str]:
    """The vector instruction sets of VECTOR_FLAGS this CPU has (empty where /proc/cpuinfo is not there)."""
    for line in _cpuinfo():
        if line.split(":")[0].strip() in ("flags", "Features"):
            have = set(line.split(":", 1)[1].split())
            return [f for f in VECTOR_FLAGS if f in have]
    return []


def describe(p: dict) -> str:
    """One line of it, for the terminal."""
    code = f"dsutil {p['dsutil']}" + (f" at {p['commit'][:10]}{' (dirty)' if p['dirty'] else ''}" if p["commit"] else "")
    return (f"{code}; python {p['python']}, torch {p['torch']}; {p['cpu']} ({', '.join(p['cpu_vector']) or 'no vector flags'}); "
            f"GPU {p['gpu'] or 'none'}; {p['date']}" + (f"; seeds {p['seeds']}" if "seeds" in p else ""))
