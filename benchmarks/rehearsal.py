"""Full-size CPU rehearsals of the GPU presets: the real code path at full data size, the compute cut by settings.

``tiny-imagenet`` (200 classes, real 64-px JPEGs) at 25,000, 50,000 and 100,000 training images (125, 250, 500
per class), and ``imagenet1k`` (an ImageFolder in ImageNet's layout: 1,000 classes of generated JPEGs, 224-px
crops, eval_resize 256). Each ``dsutil run`` runs in a fresh process with a small ConvNet teacher and student
(width 16), one teacher epoch, a few recover iterations and one relabel and training epoch (``CUT``), so a run
takes minutes; every stage, analysis and figure is the preset's own. Measured per run: the stage times
(summary.json), the main process's peak RSS (VmHWM, read as it exits) and the peak of the whole process tree's
proportional set size (PSS, loader workers included, shared pages counted once), sampled every 0.2 s.
Then the BN-statistics pass over the largest Tiny-ImageNet set with 0, 1 and 2 decoding workers.

    .venv/bin/python benchmarks/rehearsal.py                                # all of it (about an hour here)
    .venv/bin/python benchmarks/rehearsal.py --sizes 25000 --no-imagenet    # one size
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"teacher.arch": "convnet", "teacher.width": 16, "teacher.epochs": 1, "teacher.lr_warmup_epochs": 0,
         "student.arch": "convnet", "student.width": 16, "student.warmup_epochs": 0, "recover.iterations": 5,
         "relabel.epochs": 1, "device": "cpu"}
CUT = {"tiny-imagenet": SMALL | {"recover.ipc": 2, "recover.batch_images": 400},
       "imagenet1k": SMALL | {"teacher.pretrained": False, "recover.ipc": 1, "recover.batch_images": 200,
                              "recover.channels_last": False, "relabel.batch_size": 64, "student.workers": 1}}
PEAK = ("import sys; from dsutil.cli import main; rc = main(sys.argv[1:]); "
        "print('VmHWM', open('/proc/self/status').read().split('VmHWM:')[1].split()[0], file=sys.stderr); sys.exit(rc)")


def tree_pss_mib(pid: int) -> float:
    """PSS of ``pid`` and all its descendants (MiB): shared pages split between the processes sharing them."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            total += int(open(f"/proc/{p}/smaps_rollup").read().split("Pss:")[1].split()[0])
            for t in os.listdir(f"/proc/{p}/task"):
                todo += [int(c) for c in open(f"/proc/{p}/task/{t}/children").read().split()]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            pass
    return total / 1024


def timed_run(args: list[str], log: Path) -> dict:
    """``dsutil ARGS`` in a fresh process: wall seconds, its own peak RSS and the process tree's peak PSS."""
    start, peak = time.time(), [0.0]
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", PEAK, *args], cwd=ROOT, stdout=err, stderr=err)

        def sample():
            while proc.poll() is None:
                peak[0] = max(peak[0], tree_pss_mib(proc.pid))
                time.sleep(0.2)
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        rc = proc.wait()
        sampler.join()
    text = log.read_text()
    if rc:
        raise RuntimeError(f"dsutil {' '.join(args)} failed (exit {rc}); see {log}:\n{text[-3000:]}")
    return {"seconds": time.time() - start, "peak_rss_mib": int(text.rsplit("VmHWM", 1)[1].split()[0]) / 1024,
            "peak_tree_pss_mib": peak[0]}


def dsutil_run(preset: str, out: Path, extra: dict) -> dict:
    sets = [f"--set={k}={v}" for k, v in (CUT[preset] | extra).items()]
    row = timed_run(["run", preset, "--out", str(out), *sets], out.with_suffix(".log"))
    summary = json.loads((out / "summary.json").read_text())
    return row | {"train_images": summary["settings"]["data"].get("per_class"), "summary_seconds": summary["seconds"],
                  "stage_seconds_by_kind": summary["stage_seconds_by_kind"],
                  "real_within_class_cosine_images": summary["real_within_class_cosine_images"],
                  "teacher_test_top1": summary["teacher"]["test_top1"],
                  "figures": sorted(p.name for p in (out / "figures").glob("*.png"))}


def imagenet_folder(root: Path, classes: int = 1000, per_class: int = 5) -> Path:
    """root/train/nXXXXXXXX/*.JPEG (``per_class`` each) and root/val/nXXXXXXXX/0.JPEG: smooth random colour
    fields of ImageNet's typical sizes (500 x 375 and 375 x 500), saved as JPEG quality 90."""
    from PIL import Image

    if (root / "done").exists():
        return root
    rng = np.random.default_rng(0)
    for c in range(classes):
        wnid = f"n{c:08d}"
        for split, n in (("train", per_class), ("val", 1)):
            (root / split / wnid).mkdir(parents=True, exist_ok=True)
            for k in range(n):
                w, h = (500, 375) if k % 2 == 0 else (375, 500)
                small = rng.integers(0, 256, (h // 25, w // 25, 3), dtype=np.uint8)
                Image.fromarray(small).resize((w, h), Image.BILINEAR).save(root / split / wnid / f"{k}.JPEG",
                                                                          quality=90)
    (root / "done").touch()
    return root


def bn_pass_seconds(run_dir: Path, workers: int) -> dict:
    """The BN-statistics pass of squeeze over the run's training set with ``workers`` decoding processes."""
    from dsutil.data import load_from_source
    from dsutil.recover import load_squeezed
    from dsutil.squeeze import bn_statistics, normalised_batches

    teacher, _, _, info = load_squeezed(run_dir)
    data = load_from_source(info["dataset"]["source"])
    start = time.time()
    bn_statistics(teacher, normalised_batches(data, workers=workers), data.classes, "cpu")
    seconds = time.time() - start
    return {"workers": workers, "images": len(data.train), "seconds": seconds, "img_per_s": len(data.train) / seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="*", default=[25_000, 50_000, 100_000], help="none: imagenet1k only")
    p.add_argument("--no-imagenet", action="store_true")
    p.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "dsutil_rehearsal")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "rehearsal.json")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    result = {"command": " ".join(sys.argv), "cut": CUT,
              "machine": {"platform": platform.platform(), "torch": torch.__version__, "cores": os.cpu_count()},
              "tiny_imagenet": [], "bn_pass": []}
    for n in args.sizes:
        row = {"images": n} | dsutil_run("tiny-imagenet", args.work / f"tiny-{n}", {"data.per_class": n // 200})
        result["tiny_imagenet"].append(row)
        print(json.dumps(row), flush=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    for w in (0, 1, 2) if args.sizes else ():
        result["bn_pass"].append(bn_pass_seconds(args.work / f"tiny-{max(args.sizes)}", w))
        print(json.dumps(result["bn_pass"][-1]), flush=True)
    if not args.no_imagenet:
        folder = imagenet_folder(args.work / "imagenet-folder")
        result["imagenet1k"] = dsutil_run("imagenet1k", args.work / "imagenet1k", {"data.root": folder})
        print(json.dumps(result["imagenet1k"]), flush=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))


def table(result: dict) -> str:
    kinds = ("squeeze", "recover", "relabel", "student")
    head = ["train images", "wall s", *[f"{k} s" for k in kinds], "peak RSS MiB (main)", "peak PSS MiB (all)"]
    rows = [[f"{r['images']:,}", f"{r['seconds']:.0f}", *[f"{r['stage_seconds_by_kind'][k]:.0f}" for k in kinds],
             f"{r['peak_rss_mib']:.0f}", f"{r['peak_tree_pss_mib']:.0f}"] for r in result["tiny_imagenet"]]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", "| BN pass workers | images/s |", "| --- | --- |"]
    lines += [f"| {b['workers']} | {b['img_per_s']:.0f} |" for b in result["bn_pass"]]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
