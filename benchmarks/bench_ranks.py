"""Wall time of a stage on 2 torchrun ranks against 1 process, the same work, one thread per rank.

Recover (LPLD, MNIST-5k teacher, IPC 10: 10 class units) and relabel (real images, IPC 20) are run as
``python -m dsutil`` and as ``torchrun --standalone --nproc_per_node=2 -m dsutil`` with OMP_NUM_THREADS=1,
alternately, each into a fresh folder; the ratio is paired per repeat. Process start-up (the import of torch,
the process group) is included: it is what a user waits for.

    .venv/bin/python benchmarks/bench_ranks.py                 # 3 repeats
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = os.environ | {"OMP_NUM_THREADS": "1"}


def timed(args: list[str], ranks: int) -> float:
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"] \
        if ranks > 1 else [sys.executable]
    start = time.time()
    subprocess.run([*launch, "-m", "dsutil", *args], cwd=ROOT, env=ENV, check=True, capture_output=True)
    return time.time() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "dsutil_bench_ranks")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "bench_ranks.json")
    args = p.parse_args()
    base = args.work / "base"
    if not (base / "squeeze.json").exists():
        timed(["squeeze", "--dataset", "mnist5k", "--epochs", "2", "--out", base, "--device", "cpu", "--restart"], 1)
        timed(["recover", "--run-dir", base, "--method", "real", "--ipc", "20", "--device", "cpu"], 1)
    stages = {"recover": lambda run: ["recover", "--run-dir", run, "--method", "lpld", "--ipc", "10", "--iterations",
                                      "300", "--batch-images", "10", "--device", "cpu"],
              "relabel": lambda run: ["relabel", "--run-dir", run, "--images", run / "recover" / "real-ipc20",
                                      "--epochs", "60", "--batch-size", "50", "--workers", "0", "--device", "cpu"]}
    rows = []
    for repeat in range(args.repeats):
        for stage, command in stages.items():
            seconds = {}
            for ranks in ((1, 2) if repeat % 2 == 0 else (2, 1)):
                run = args.work / f"{stage}-{ranks}"
                shutil.rmtree(run, ignore_errors=True)
                shutil.copytree(base, run, ignore=shutil.ignore_patterns("lpld-ipc10", "labels"))
                seconds[ranks] = timed([str(a) for a in command(run)], ranks)
            rows.append({"repeat": repeat, "stage": stage, "seconds_1_rank": seconds[1], "seconds_2_ranks": seconds[2],
                         "speedup": seconds[1] / seconds[2]})
            print(json.dumps(rows[-1]), flush=True)
    result = {"command": " ".join(sys.argv), "machine": {"platform": platform.platform(), "cores": os.cpu_count()},
              "rows": rows}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for stage in stages:
        speedups = sorted(r["speedup"] for r in rows if r["stage"] == stage)
        print(f"{stage}: 2 ranks / 1 rank speedup, median {speedups[len(speedups) // 2]:.2f} "
              f"(min {speedups[0]:.2f}, max {speedups[-1]:.2f})")


if __name__ == "__main__":
    main()
