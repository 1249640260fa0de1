"""Recover engine speed against the bound of a bare teacher forward+backward.

The engine adds augmentation, BN hooks and per-group statistics to each
teacher pass; this measures how much of the bare pass's speed it keeps, as
image-iterations per second at the same batch size, alternating the two in
one process so machine noise hits both alike. ``--pack`` also times the
engine with fewer images per teacher pass (``--pack 10`` with IPC 10 is one
class at a time, as the reference code runs LPLD), to show what batching
groups buys on a GPU.

    python benchmarks/bench_recover.py [--run RUN_DIR] [--method lpld] [--ipc 10] [--iterations 50]
    python benchmarks/bench_recover.py --arch resnet18 --image-size 64 --num-classes 200 --ipc 50 \
        --device cuda --bf16 --channels-last --pack 50          # Tiny-ImageNet-sized, a GPU job

Without --run and with the default ``--arch convnet`` it trains the MNIST-5k
teacher first (about 30 s on 2 cores). With another ``--arch`` the teacher is
randomly initialised and its BN statistics are measured on random images:
speed does not depend on the weights, and no data set is needed.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dsutil.data import load_dataset
from dsutil.models import build_model
from dsutil.recover import BNTargets, RecoverConfig, load_squeezed, make_groups, pack_groups, synthesize
from dsutil.squeeze import TeacherConfig, bn_statistics, squeeze


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bare(teacher, n, num_classes, shape, iterations, device, bf16, channels_last):
    x = torch.randn(n, *shape, device=device, requires_grad=True)
    y = torch.arange(n, device=device) % num_classes
    opt = torch.optim.Adam([x], lr=0.1, betas=(0.5, 0.9))
    sync(device)
    start = time.perf_counter()
    for _ in range(iterations):
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            logits = teacher(x.contiguous(memory_format=torch.channels_last) if channels_last else x)
        loss = F.cross_entropy(logits.float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    sync(device)
    return n * iterations / (time.perf_counter() - start)


def engine(teacher, stats, args, classes, shape, device, pack):
    """Image-iterations per second of ``synthesize`` over ``classes``, ``pack`` images per teacher pass."""
    cfg = RecoverConfig(method=args.method, ipc=args.ipc, iterations=args.iterations, batch_images=pack,
                        bf16=args.bf16, channels_last=args.channels_last)
    targets = BNTargets(teacher, stats, "running", device)
    pixel_range = (torch.full((shape[0], 1, 1), -3.0), torch.full((shape[0], 1, 1), 3.0))
    groups = make_groups(args.method, args.ipc, classes, seed=0)
    sync(device)
    start = time.perf_counter()
    for batch in pack_groups(groups, pack):
        synthesize(teacher, batch, targets, args.method, cfg, shape, pixel_range, device)
    sync(device)
    return sum(len(g.labels) for g in groups) * args.iterations / (time.perf_counter() - start)


def random_teacher(args, device):
    """A randomly initialised ``--arch`` with BN statistics of random images (two per class)."""
    teacher = build_model(args.arch, args.num_classes, 3, args.image_size).to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    labels = torch.arange(args.num_classes).repeat(2)
    batches = ((torch.randn(len(idx), 3, args.image_size, args.image_size), labels[idx])
               for idx in torch.arange(len(labels)).split(256))
    stats = bn_statistics(teacher, batches, [str(c) for c in range(args.num_classes)], device)
    return teacher, stats, (3, args.image_size, args.image_size), args.num_classes


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, help="a squeezed run (default: train the MNIST-5k teacher)")
    p.add_argument("--arch", default="convnet", help="another arch: a random teacher of that kind instead")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--num-classes", type=int, default=200)
    p.add_argument("--classes", type=int, default=None, help="recover only the first N classes (default: all)")
    p.add_argument("--method", default="lpld")
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--iterations", type=int, default=50)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--pack", type=int, nargs="*", default=[],
                   help="also time the engine with these images per teacher pass")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--profile", action="store_true", help="print the engine's costliest ops (torch.profiler)")
    p.add_argument("--out", type=Path, default=Path(__file__).with_name("bench_recover.json"))
    args = p.parse_args()
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    if args.arch == "convnet":
        run = args.run
        if run is None:
            run = Path(tempfile.mkdtemp())
            squeeze(load_dataset("mnist5k"), run, TeacherConfig(), device=args.device, progress=False)
        teacher, spec, stats, _ = load_squeezed(run, device)
        shape, num_classes = (spec["in_channels"], spec["image_size"], spec["image_size"]), spec["num_classes"]
    else:
        teacher, stats, shape, num_classes = random_teacher(args, device)
    if args.channels_last:
        teacher = teacher.to(memory_format=torch.channels_last)
    classes = range(min(args.classes or num_classes, num_classes))
    batch = args.ipc * len(classes)  # every group in one pass
    rows = []
    for r in range(args.repeats + 1):  # the first round warms up (cuDNN autotuning, allocator) and is not kept
        row = {"repeat": r, "bare_img_it_per_s": bare(teacher, batch, num_classes, shape, args.iterations, device,
                                                      args.bf16, args.channels_last)}
        row["engine_img_it_per_s"] = engine(teacher, stats, args, classes, shape, device, batch)
        row["ratio"] = row["engine_img_it_per_s"] / row["bare_img_it_per_s"]
        for pack in args.pack:
            row[f"engine_pack{pack}_img_it_per_s"] = engine(teacher, stats, args, classes, shape, device, pack)
        if r == 0:
            continue
        rows.append(row)
        print("  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            engine(teacher, stats, args, classes, shape, device, batch)
        key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=15, max_name_column_width=40))
    median = lambda key: sorted(row[key] for row in rows)[len(rows) // 2]  # noqa: E731
    result = {"command": "benchmarks/bench_recover.py " + " ".join(sys.argv[1:]),
              "machine": {"platform": platform.platform(), "torch": torch.__version__, "device": str(device),
                          "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                          "threads": torch.get_num_threads()},
              "arch": args.arch, "image_shape": shape, "method": args.method, "ipc": args.ipc,
              "classes": len(classes), "batch": batch, "iterations": args.iterations, "bf16": args.bf16,
              "channels_last": args.channels_last, "median_ratio": median("ratio"),
              "median_img_it_per_s": {k: median(k) for k in rows[0] if k.endswith("_per_s")}, "rows": rows}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"median ratio engine / bare: {result['median_ratio']:.3f} -> {args.out}")


if __name__ == "__main__":
    main()
