"""How long does a student checkpoint take to write? (why ``train --checkpoint-seconds`` defaults to 120)

A ResNet-18 student's checkpoint as ``train_student`` writes it (weights, AdamW state, scheduler, per-image
dynamics; torch.save through ``atomic_path``), for Tiny-ImageNet (64 px, 200 classes, 10,000 images) and
ImageNet-1K (224 px, 1,000 classes, 50,000 images) heads, written ``--repeats`` times into ``--dir``.

    .venv/bin/python benchmarks/bench_checkpoint.py --repeats 5
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "bench_checkpoint.json")
    args = p.parse_args()
    from dsutil.dynamics import Dynamics
    from dsutil.files import atomic_path
    from dsutil.models import build_model

    rows = []
    for name, size, classes, images in (("tiny-imagenet", 64, 200, 10_000), ("imagenet-1k", 224, 1000, 50_000)):
        model = build_model("resnet18", classes, 3, size)
        opt = torch.optim.AdamW(model.parameters(), 1e-3)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 100)
        model(torch.randn(2, 3, size, size)).sum().backward()
        opt.step()  # AdamW's two moments exist from the first step
        state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                 "epoch": 0, "fingerprint": "x" * 500, "dynamics": Dynamics(images, 1).state}
        path, seconds = args.dir / f"bench_checkpoint_{name}.pt", []
        for _ in range(args.repeats):
            start = time.perf_counter()
            with atomic_path(path) as tmp:
                torch.save(state, tmp)
            seconds.append(time.perf_counter() - start)
        rows.append({"student": f"resnet18 {size} px, {classes} classes, {images} images", "mib": path.stat().st_size / 2**20,
                     "seconds": seconds, "median_seconds": statistics.median(seconds)})
        path.unlink()
        print(json.dumps(rows[-1]), flush=True)
    result = {"command": "benchmarks/bench_checkpoint.py " + " ".join(sys.argv[1:]),
              "machine": {"platform": platform.platform(), "cores": os.cpu_count(), "torch": torch.__version__,
                          "dir": str(args.dir)}, "rows": rows}
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
