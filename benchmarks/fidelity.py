"""What dsutil's deliberate differences from the official code do to the finding, on tiny-imagenet-10.

Three parts (issue 20's must-show), all on the preset's teacher, one recover seed, students with seeds:

* ``targets``: class-wise BN targets from plain images with exact sums (dsutil's default), from augmented
  views with exact sums, and from augmented views with the official per-class running averages; LPLD with
  class targets and SRe2L with the measured global targets of the same views (plus the preset's SRe2L, which
  matches the BN layers' running buffers). Within-class cosine and student top-1 at r = 0 and 0.975.
* ``pools``: the three random pruning pools (uniform, the official first 1 - r drawn with replacement, and the
  coverage-balanced one) at r = 0.9, 0.975 and 0.99 for LPLD and SRe2L: top-1 and the images never labelled.
* ``topk``: LPLD's top-2 and top-5 labels at r = 0.975 with the zero (MR-k), min (MRS-k) and mass fills.
* ``images``: LPLD's images kept as the official JPEG-75 round trip against lossless pixels (r = 0, 0.975).
* ``student``: the official student's 5-epoch warm-up and no weight decay on 1-D parameters (LPLD, r = 0.975).

Every stage is cached in the run folders (runs/<preset> and runs/<preset>-bn-*), so a rerun only reads them;
results go to benchmarks/fidelity.json after each part.

    .venv/bin/python benchmarks/fidelity.py                     # all parts (about 50 minutes on 2 cores)
    .venv/bin/python benchmarks/fidelity.py --parts pools topk
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import replace
from pathlib import Path

import torch

from dsutil.analysis import within_class_cosine
from dsutil.config import load_config
from dsutil.image_store import ImageSet
from dsutil.labels import LabelStore, coverage, select_batches
from dsutil.layout import SQUEEZE_MARKER, made_from_teacher
from dsutil.models import penultimate_features
from dsutil.recover import load_squeezed
from dsutil.runner import Stages, ensure_labels, ensure_recover, ensure_student, over_seeds
from dsutil.squeeze import squeeze, squeeze_identity

ROOT = Path(__file__).resolve().parents[1]
TARGETS = [("augmented", "running"), ("augmented", "exact"), ("plain", "exact")]
POOLS = [("uniform", "cycle"), ("first", "replacement"), ("balanced", "cycle")]


def squeezed_variant(cfg, base: Path, views: str, estimator: str, stages: Stages) -> Path:
    """A run folder with the base run's teacher and BN statistics of the given views and estimator."""
    out = base.parent / f"{base.name}-bn-{views}-{estimator}"
    teacher = base / "teacher.safetensors"
    tcfg = replace(cfg.teacher, bn_views=views, bn_estimator=estimator)
    data = cfg.data.load()
    stages("squeeze", out / SQUEEZE_MARKER, squeeze_identity(data, tcfg, teacher),
           lambda: squeeze(data, out, tcfg, cfg.device, teacher_checkpoint=teacher), own=made_from_teacher())
    return out


def cosine(run: Path, rdir: Path) -> float:
    teacher = load_squeezed(run)[0]
    images = ImageSet(rdir / "images.safetensors")
    return within_class_cosine(penultimate_features(teacher, images), images.labels)


def students(cfg, run: Path, method: str, ipc: int, ratios, stages, seeds, **changes) -> dict:
    data = cfg.data.load()
    out = {}
    for r in ratios:
        runs = [ensure_student(run, method, replace(cfg.student, prune_ratio=r, seed=s, **changes), ipc, cfg.device,
                               data, stages=stages) for s in seeds]
        out[str(r)] = over_seeds(runs, seeds) | {k: runs[0].get(k) for k in ("images_never_labelled",)}
    return out


def wait_for(base: Path) -> Path:
    """The base run, once its summary.json says it is finished (it may be running in another process)."""
    while not (base / "summary.json").exists():
        print(f"waiting for {base / 'summary.json'} (run `dsutil run` on the preset first)", flush=True)
        time.sleep(60)
    return base


def part_targets(cfg, base: Path, stages: Stages, seeds, results: dict, save) -> None:
    todo = [(views, estimator, method) for method in ("lpld", "sre2l") for views, estimator in TARGETS]
    todo.sort(key=lambda t: t == ("plain", "exact", "lpld"))  # last: the preset's own LPLD, read from the base run
    for views, estimator, method in todo:
        overrides = {"global_targets": "measured"} if method == "sre2l" else {}
        if (views, estimator, method) == ("plain", "exact", "lpld"):
            run = wait_for(base)
        else:
            run = squeezed_variant(cfg, base, views, estimator, stages)
        key = f"{method}{'-measured' if overrides else ''} {views}-{estimator}"
        results[key] = method_point(cfg, run, method, overrides, stages, seeds)
        print(key, json.dumps({r: round(s["test_top1"], 4) for r, s in results[key]["students"].items()}), flush=True)
        save()
    # the preset's SRe2L: the BN layers' running buffers (the official SRe2L targets)
    results["sre2l-buffers"] = method_point(cfg, wait_for(base), "sre2l", {}, stages, seeds)


def method_point(cfg, run: Path, method: str, overrides: dict, stages: Stages, seeds) -> dict:
    """Recover and relabel ``method`` in ``run`` (cached), then its cosine and students at r = 0 and 0.975."""
    rcfg = replace(cfg.recover_config(method), **overrides)
    rdir = ensure_recover(run, rcfg, cfg.device, stages=stages)
    ensure_labels(run, method, rcfg.ipc, cfg.relabel, cfg.device, stages=stages)
    return {"run": str(run), "within_class_cosine": cosine(run, rdir),
            "students": students(cfg, run, method, rcfg.ipc, [0.0, 0.975], stages, seeds)}


def part_pools(cfg, base: Path, stages: Stages, seeds, results: dict, save) -> None:
    base = wait_for(base)
    for method in ("lpld", "sre2l"):
        ipc = cfg.recover_config(method).ipc
        store = LabelStore(base / "labels" / f"{method}-ipc{ipc}")
        n = store.manifest["num_images"]
        for pool, draw in POOLS:
            key = f"{method} {pool}"
            results[key] = students(cfg, base, method, ipc, [0.99, 0.975, 0.9], stages, seeds, pool=pool, draw=draw)
            for r, point in results[key].items():  # the kept pool's coverage (what uniform students predate)
                point["kept_pool_coverage"] = coverage(store, select_batches(store, float(r), pool=pool, seed=seeds[0]), n)
            print(key, json.dumps({r: (round(s["test_top1"], 4), s["kept_pool_coverage"]["images_never_labelled"])
                                   for r, s in results[key].items()}), flush=True)
            save()


def part_topk(cfg, base: Path, stages: Stages, seeds, results: dict, save) -> None:
    base = wait_for(base)
    method, ipc, data = "lpld", cfg.recover_config("lpld").ipc, cfg.data.load()
    for k in (2, 5):
        for fill in ("zero", "min", "mass"):
            store = ensure_labels(base, method, ipc, replace(cfg.relabel, topk=k, topk_fill=fill), cfg.device,
                                  stages=stages)
            runs = [ensure_student(base, method, replace(cfg.student, prune_ratio=0.975, seed=s), ipc, cfg.device, data,
                                   stages=stages, store=store,
                                   folder=base / "students" / f"{method}-ipc{ipc}-k{k}-{fill}-r0.975-s{s}")
                    for s in seeds]
            results[f"top-{k} {fill}"] = over_seeds(runs, seeds)
            print(f"top-{k} {fill}", round(results[f"top-{k} {fill}"]["test_top1"], 4), flush=True)
            save()


def part_images(cfg, base: Path, stages: Stages, seeds, results: dict, save) -> None:
    """LPLD recovered again with the official JPEG-75 round trip, under another method name (its own folder)."""
    base = wait_for(base)
    run = squeezed_variant(cfg, base, "plain", "exact", stages)  # the base teacher and targets, a folder of its own
    results["lpld jpeg75"] = method_point(cfg, run, "lpld", {"image_format": "jpeg75", "pixels": "uint8"}, stages, seeds)
    save()


def part_student(cfg, base: Path, stages: Stages, seeds, results: dict, save) -> None:
    base = wait_for(base)
    for name, changes in (("warm-up 5", {"warmup_epochs": 5}), ("no decay on 1-D", {"decay_1d": False})):
        results[name] = students(cfg, base, "lpld", cfg.recover_config("lpld").ipc, [0.975], stages, seeds, **changes)
        save()


def cell(point: dict) -> str:
    std = point.get("test_top1_std")
    return f"{point['test_top1'] * 100:.1f}" + ("" if std is None else f" ± {std * 100:.1f}")


def report(results: dict) -> str:
    """The markdown tables of docs/fidelity.md, from the results file."""
    lines = []
    t = results.get("targets", {})
    if t:
        lines += ["| BN targets | method | within-class cosine | top-1 r = 0 | top-1 r = 0.975 |", "| --- | --- | --- | --- | --- |"]
        for key, point in t.items():
            if key == "seeds":
                continue
            method, _, targets = key.partition(" ")
            st = point["students"]
            lines.append(f"| {targets or 'BN running buffers'} | {method} | {point['within_class_cosine']:.3f} | "
                         f"{cell(st['0.0'])} | {cell(st['0.975'])} |")
        lines.append("")
    pools = results.get("pools", {})
    if pools:
        lines += ["| method | pool | r = 0.9 | r = 0.975 | r = 0.99 |", "| --- | --- | --- | --- | --- |"]
        for key, point in pools.items():
            if key == "seeds":
                continue
            method, pool = key.split()
            cells = [f"{cell(point[r])} ({point[r]['kept_pool_coverage']['images_never_labelled'] * 100:.0f}%)"
                     if r in point else "" for r in ("0.9", "0.975", "0.99")]
            lines.append(f"| {method} | {pool} | " + " | ".join(cells) + " |")
        lines.append("")
    topk = results.get("topk", {})
    if topk:
        lines += ["| label | fill | top-1 r = 0.975 |", "| --- | --- | --- |"]
        for key, point in topk.items():
            if key != "seeds":
                k, fill = key.split()
                lines.append(f"| {k} | {fill} | {cell(point)} |")
        lines.append("")
    for name in ("images", "student"):
        for key, point in results.get(name, {}).items():
            if key == "seeds":
                continue
            st = point.get("students", point)
            cos = f"cosine {point['within_class_cosine']:.3f}; " if "within_class_cosine" in point else ""
            lines.append(f"- {key}: {cos}" + "; ".join(f"r = {r}: {cell(v)}" for r, v in st.items()))
    return "\n".join(lines)


PAPER_SETTINGS = {"Tiny-ImageNet IPC 50": (200 * 50, 64, 100), "ImageNet-1K IPC 10": (1000 * 10, 128, 300)}


def part_coverage(cfg, base: Path, stages: Stages, seeds, results: dict, save) -> None:
    """The share of images no kept label batch covers, at the paper's sizes: epochs of shuffled batches as
    relabel draws them, each pool at each ratio (no teacher needed: only which images each batch holds)."""
    from dsutil.labels import pool_order

    for name, (n, batch, epochs) in PAPER_SETTINGS.items():
        gen = torch.Generator().manual_seed(0)
        batches = [part for _ in range(epochs) for part in torch.randperm(n, generator=gen).split(batch)]
        per_epoch = len(batches) // epochs
        units = [[(i // per_epoch, i % per_epoch)] for i in range(len(batches))]
        for pool in ("uniform", "first", "balanced"):
            order = pool_order(units, pool, torch.Generator().manual_seed(1))
            for r in (0.9, 0.975, 0.99):
                keep = order[:max(1, round(len(units) * (1 - r)))]
                counts = torch.bincount(torch.cat([batches[i] for i in keep]), minlength=n)
                results[f"{name} {pool} {r}"] = float((counts == 0).double().mean())
    save()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny-imagenet-10")
    parser.add_argument("--run", type=Path, default=None, help="the preset's run folder (default runs/<preset>)")
    parser.add_argument("--parts", nargs="+", default=["targets", "pools", "topk", "images", "student"],
                        choices=["targets", "pools", "topk", "images", "student", "coverage"])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "fidelity.json")
    parser.add_argument("--report", action="store_true", help="print the markdown tables of the results file")
    args = parser.parse_args()
    if args.report:
        print(report(json.loads(args.out.read_text())))
        return
    cfg = load_config(args.preset)
    base = args.run or ROOT / "runs" / cfg.name
    if not (base / "squeeze.stage.json").exists():
        raise SystemExit(f"{base} holds no squeezed run: run `dsutil run {args.preset} --out {base}` first")
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    stages = Stages()
    parts = {"targets": (part_targets, cfg.student_seeds()), "pools": (part_pools, cfg.student_seeds()),
             "topk": (part_topk, [0, 1]), "images": (part_images, cfg.student_seeds()),
             "student": (part_student, cfg.student_seeds()), "coverage": (part_coverage, [])}
    results["machine"] = {"python": platform.python_version(), "torch": torch.__version__,
                          "processor": platform.processor() or platform.machine()}

    def save() -> None:  # after every point: a long run's finished points are never lost
        args.out.write_text(json.dumps(results, indent=1) + "\n")

    for name in args.parts:
        fn, seeds = parts[name]
        part = results.setdefault(name, {})
        fn(cfg, base, stages, seeds, part, save)
        part["seeds"] = seeds
        save()


if __name__ == "__main__":
    main()
