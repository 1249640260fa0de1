"""Crash loop: SIGKILL a dsutil stage at random moments, rerun it until it finishes, compare with a clean run.

    python benchmarks/crash_loop.py --run RUN --kills 20 [--seed 0] [--out DIR]

For relabel and student training on the run's ``real`` images (made if missing), each stage is started,
killed after a random delay, and started again, until it exits by itself; the outputs must then equal
those of an uninterrupted run of the same command (label epoch files byte for byte; student weights to
float tolerance). Prints one JSON line per stage with the kill times and the verdict. The test suite runs
the same loop with a few kills (tests/test_crash_loop.py).
"""
from __future__ import annotations

import argparse
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path


def kill_until_done(cmd: list[str], delays: list[float], timeout: float = 600) -> list[float]:
    """Run ``cmd``; SIGKILL it after each delay in turn; then run it to the end. Returns the delays at which
    a kill really interrupted it (the run was still going)."""
    killed = []
    for delay in delays:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            proc.wait(delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            killed.append(delay)
            continue
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed after a kill: {proc.stderr.read().decode()[-2000:]}")
        return killed  # finished before the kill
    done = subprocess.run(cmd, capture_output=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed after the kills: {done.stderr.decode()[-2000:]}")
    return killed


def dsutil(*args) -> list[str]:
    return [sys.executable, "-m", "dsutil", *map(str, args), "--device", "cpu"]


def relabel_cmd(run: Path, out: Path, epochs: int) -> list[str]:
    return dsutil("relabel", "--run", run, "--images", run / "recover" / "real-ipc5", "--epochs", epochs,
                  "--batch-size", 10, "--out", out)


def train_cmd(run: Path, labels: Path, out: Path, epochs: int) -> list[str]:
    return dsutil("train", "--run", run, "--labels", labels, "--epochs", epochs, "--width", 32, "--lr", 3e-3,
                  "--checkpoint-seconds", 0, "--out", out)  # a checkpoint every epoch: kills land between them


def same_store(a: Path, b: Path) -> bool:
    files = sorted(p.name for p in a.glob("epoch*.safetensors"))
    return files == sorted(p.name for p in b.glob("epoch*.safetensors")) and \
        all((a / f).read_bytes() == (b / f).read_bytes() for f in files) and \
        json.loads((a / "manifest.json").read_text())["present"] == json.loads((b / "manifest.json").read_text())["present"]


def same_student(a: Path, b: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    x, y = load_file(a / "student.safetensors"), load_file(b / "student.safetensors")
    return x.keys() == y.keys() and all(torch.allclose(x[k], y[k], rtol=1e-5, atol=1e-6) for k in x) and \
        not (b / "checkpoint.pt").exists()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="a squeezed run (e.g. from dsutil demo)")
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--relabel-epochs", type=int, default=1000)
    p.add_argument("--student-epochs", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("/tmp/dsutil-crash-loop"))
    args = p.parse_args()
    rng = random.Random(args.seed)
    if not (args.run / "recover" / "real-ipc5").exists():
        subprocess.run(dsutil("recover", "--run", args.run, "--method", "real", "--ipc", 5), check=True)
    clean, crashed = args.out / "clean", args.out / "crashed"
    for cmd in (relabel_cmd(args.run, clean / "labels", args.relabel_epochs),
                train_cmd(args.run, clean / "labels", clean / "student", args.student_epochs)):
        start = time.time()
        subprocess.run(cmd, check=True, capture_output=True)
        print(f"clean {cmd[3]}: {time.time() - start:.1f} s", flush=True)
    for stage, cmd, same in (("relabel", relabel_cmd(args.run, crashed / "labels", args.relabel_epochs),
                              lambda: same_store(clean / "labels", crashed / "labels")),
                             ("train", train_cmd(args.run, clean / "labels", crashed / "student", args.student_epochs),
                              lambda: same_student(clean / "student", crashed / "student"))):
        delays = [rng.uniform(3.0, 6.0) for _ in range(args.kills)]  # the import of torch takes about 3 s
        killed = kill_until_done(cmd, delays)
        print(json.dumps({"stage": stage, "kills": len(killed), "kill_times_s": [round(d, 2) for d in killed],
                          "equal_to_clean_run": same()}), flush=True)


if __name__ == "__main__":
    main()
