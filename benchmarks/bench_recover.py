"""Recover engine speed against the bound of a bare teacher forward+backward.

The engine adds augmentation, BN hooks and per-group statistics to each
teacher pass; this measures how much of the bare pass's speed it keeps, as
image-iterations per second at the same batch size, alternating the two in
one process so machine noise hits both alike.

    python benchmarks/bench_recover.py [--run RUN_DIR] [--method lpld] [--batch 100] [--iterations 50]

Without --run it trains the MNIST-5k teacher first (about 30 s on 2 cores).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dsutil.data import load_dataset
from dsutil.recover import BNTargets, RecoverConfig, load_squeezed, make_groups, synthesize
from dsutil.squeeze import TeacherConfig, squeeze


def bare(teacher, n, shape, iterations, device):
    x = torch.randn(n, *shape, device=device, requires_grad=True)
    y = torch.arange(n, device=device) % 10
    opt = torch.optim.Adam([x], lr=0.1, betas=(0.5, 0.9))
    start = time.perf_counter()
    for _ in range(iterations):
        loss = F.cross_entropy(teacher(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return n * iterations / (time.perf_counter() - start)


def engine(teacher, stats, method, ipc, num_classes, shape, iterations, device):
    cfg = RecoverConfig(method=method, ipc=ipc, iterations=iterations, batch_images=ipc * num_classes)
    groups = make_groups(method, ipc, range(num_classes), seed=0)
    targets = BNTargets(teacher, stats, "running", device)
    pixel_range = (torch.full((shape[0], 1, 1), -3.0), torch.full((shape[0], 1, 1), 3.0))
    start = time.perf_counter()
    synthesize(teacher, groups, targets, method, cfg, shape, pixel_range, device)
    return ipc * num_classes * iterations / (time.perf_counter() - start)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path)
    p.add_argument("--method", default="lpld")
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--iterations", type=int, default=50)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=Path(__file__).with_name("bench_recover.json"))
    args = p.parse_args()
    run = args.run
    if run is None:
        run = Path(tempfile.mkdtemp())
        squeeze(load_dataset("mnist5k"), run, TeacherConfig(), device=args.device, progress=False)
    device = torch.device(args.device)
    teacher, spec, stats, _ = load_squeezed(run, device)
    shape = (spec["in_channels"], spec["image_size"], spec["image_size"])
    c = spec["num_classes"]
    rows = []
    for r in range(args.repeats):
        b = bare(teacher, args.ipc * c, shape, args.iterations, device)
        e = engine(teacher, stats, args.method, args.ipc, c, shape, args.iterations, device)
        rows.append({"repeat": r, "bare_img_it_per_s": b, "engine_img_it_per_s": e, "ratio": e / b})
        print(f"repeat {r}: bare {b:8.0f} img-it/s  engine {e:8.0f} img-it/s  ratio {e / b:.3f}")
    ratios = sorted(row["ratio"] for row in rows)
    result = {"method": args.method, "batch": args.ipc * c, "iterations": args.iterations, "device": args.device,
              "threads": torch.get_num_threads(), "median_ratio": ratios[len(ratios) // 2], "rows": rows}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"median ratio engine / bare: {result['median_ratio']:.3f} -> {args.out}")


if __name__ == "__main__":
    main()
