"""Cost of the tiny-imagenet-10 preset at 64 px against 32 px, stage by stage, on this machine.

The preset runs its ConvNet-3 teacher and students on Tiny-ImageNet resized to 32 px. This measures what
the native 64 px would cost: seconds per unit of work of each stage's loop (a teacher training step, a
recover iteration of the preset's 100 images, a relabel batch, a student step), at both sizes, alternating
the sizes in one process so that machine load hits both alike; the ratio 64/32 is paired per repeat and
the median reported. With ``--run32`` (a finished 32 px run of the preset) it also projects the whole
preset's wall time at 64 px from the times that run's stages recorded (``--ratios`` takes the ratios of an
earlier result instead of measuring them again).

    python benchmarks/bench_image_size.py [--repeats 3] [--run32 runs/tiny-imagenet-10] [--ratios JSON]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dsutil.config import load_config
from dsutil.models import build_model
from dsutil.recover import BNTargets, make_groups, synthesize
from dsutil.squeeze import bn_statistics


def timed(fn, repeat: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def stage_costs(data, cfg, steps: int) -> dict[str, float]:
    """Seconds per unit of each stage's loop for the preset's models at this data's image size."""
    c, h, _ = data.shape
    k = data.num_classes
    teacher = build_model("convnet", k, c, h, width=cfg.teacher.width, depth=cfg.teacher.depth)
    x = data.normalize(data.train.images[:cfg.teacher.batch_size])
    y = data.train.targets[:cfg.teacher.batch_size]
    opt = torch.optim.SGD(teacher.parameters(), 0.01, momentum=0.9)

    def teacher_step():
        loss = F.cross_entropy(teacher(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    out = {"teacher step (batch %d)" % len(x): timed(teacher_step, steps)}
    teacher.eval()
    stats = bn_statistics(teacher, [(x, y)], data.classes)
    rcfg = cfg.recover_config("lpld")
    groups = make_groups("lpld", rcfg.ipc, range(k), 0, rcfg.chunk_classes)
    targets = BNTargets(teacher, stats, rcfg.global_targets, torch.device("cpu"))
    for p in teacher.parameters():
        p.requires_grad_(False)

    def recover_iterations():
        synthesize(teacher, groups, targets, "lpld", type(rcfg)(**{**rcfg.__dict__, "iterations": steps}),
                   data.shape, data.pixel_range(), torch.device("cpu"))

    out[f"recover iteration ({rcfg.ipc * k} images)"] = timed(recover_iterations, 1) / steps
    xb = data.normalize(data.train.images[:cfg.relabel.batch_size])
    with torch.no_grad():
        out[f"relabel batch ({len(xb)})"] = timed(lambda: teacher(xb), steps)
    student = build_model("convnet", k, c, h, width=cfg.student.width, depth=cfg.student.depth)
    sopt = torch.optim.AdamW(student.parameters(), 1e-3)
    with torch.no_grad():
        target = teacher(xb)

    def student_step():
        loss = F.kl_div(F.log_softmax(student(xb) / 4, 1), F.log_softmax(target / 4, 1), reduction="batchmean",
                        log_target=True)
        sopt.zero_grad()
        loss.backward()
        sopt.step()

    out[f"student step (batch {len(xb)})"] = timed(student_step, steps)
    return out


def recorded_seconds(run: Path) -> dict[str, float]:
    """Seconds per kind of stage of the preset (not what notebooks added to the run), as each stage
    recorded them in its own files."""
    read = lambda p: json.loads(p.read_text())  # noqa: E731
    summary = read(run / "summary.json")
    methods = [f"{m}-ipc{v['ipc']}" for m, v in summary["methods"].items()]
    students = [name.split(" ", 1)[1] for name in summary["stage_seconds"] if name.startswith("student ")]
    return {"squeeze": read(run / "squeeze.json")["seconds"],
            "recover": sum(read(run / "recover" / m / "recover.json")["seconds_this_process"] for m in methods),
            "relabel": sum(read(run / "labels" / m / "timing.json")["seconds"] for m in methods),
            "student": sum(read(run / "students" / s / "train.json")["seconds"] for s in students)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10, help="loop iterations timed per stage and repeat")
    ap.add_argument("--run32", type=Path, default=None, help="a finished 32 px run of the preset, to project from")
    ap.add_argument("--ratios", type=Path, default=None, help="an earlier result JSON: project without timing")
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("bench_image_size.json"))
    args = ap.parse_args(argv)
    if args.ratios:
        result = json.loads(args.ratios.read_text())
    else:
        torch.manual_seed(0)
        cfg = load_config("tiny-imagenet-10")
        data = {px: load_config("tiny-imagenet-10", {"data.image_size": px}).data.load() for px in (32, 64)}
        per_size = {32: [], 64: []}
        for r in range(args.repeats):
            for px in ((32, 64) if r % 2 == 0 else (64, 32)):
                per_size[px].append(stage_costs(data[px], cfg, args.steps))
        stages = list(per_size[32][0])
        result = {"command": "python benchmarks/" + Path(__file__).name + " " + " ".join(argv or sys.argv[1:]),
                  "machine": {"platform": platform.platform(), "processor": platform.processor(),
                              "threads": torch.get_num_threads(), "torch": torch.__version__},
                  "seconds_per_unit": {px: {s: statistics.median(m[s] for m in v) for s in stages}
                                       for px, v in per_size.items()},
                  "ratio_64_over_32": {s: statistics.median(b[s] / a[s] for a, b in zip(per_size[32], per_size[64]))
                                       for s in stages}}
    ratio = result["ratio_64_over_32"]
    stages = list(ratio)
    if args.run32:
        kinds = recorded_seconds(args.run32)
        unit = {"squeeze": ratio[stages[0]], "recover": ratio[stages[1]], "relabel": ratio[stages[2]],
                "student": ratio[stages[3]]}
        result["projection_64px_seconds"] = {k: kinds[k] * unit[k] for k in kinds}
        result["projection_64px_seconds"]["total"] = sum(result["projection_64px_seconds"].values())
        result["measured_32px_seconds"] = kinds | {"total": sum(kinds.values())}
    per_unit = {int(px): v for px, v in result["seconds_per_unit"].items()}
    for s in stages:
        print(f"{s:32s} 32 px {per_unit[32][s] * 1e3:8.1f} ms   64 px {per_unit[64][s] * 1e3:8.1f} ms   "
              f"ratio {ratio[s]:.2f}")
    if args.run32:
        print("whole preset, 32 px measured -> 64 px projected (s):",
              {k: (round(result["measured_32px_seconds"][k]), round(v)) for k, v in
               result["projection_64px_seconds"].items()})
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
