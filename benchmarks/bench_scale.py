"""Scaling of the streamed data path: peak memory and speed against the number of distilled images.

For N distilled 64-px RGB images (random pixels: the teacher's speed does not depend on them), each in a fresh
process so that its peak resident memory (VmHWM of the main process, read as it exits; the memory runs use no
workers) is its own:

* ``dsutil import`` of an ImageFolder of N PNGs into one run (teacher: ConvNet-4 of width 128, the usual 64-px
  Tiny-ImageNet ConvNet, trained 1 epoch on 10 classes; ResNet-18 at 64 px labels 35 images/s here, too slow),
* ``dsutil relabel`` 1 epoch of batch 50 (0 and 1 replay workers), ``dsutil train`` 1 epoch (ConvNet-64 student),

and in this process: the BN-statistics pass (``bn_statistics`` over ``normalised_batches``) over an ImageFolder
of the same N files with 0 and 2 decoding workers, and a bare teacher forward at the relabel batch (50) right
before each relabel, for the ratio relabel / bare. Then a projection for ImageNet-1K from the per-image costs.

    .venv/bin/python benchmarks/bench_scale.py                       # N = 1000, 2000, 5000, 20000
    .venv/bin/python benchmarks/bench_scale.py --sizes 2000 20000 --out /tmp/scale.json
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

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
BATCH = 50


PEAK = ("import sys; from dsutil.cli import main; rc = main(sys.argv[1:]); "
        "print('VmHWM', open('/proc/self/status').read().split('VmHWM:')[1].split()[0], file=sys.stderr); sys.exit(rc)")


def run(args: list[str], env: dict | None = None) -> dict:
    """``dsutil ARGS`` in a fresh process (``env``: extra environment): wall seconds and its peak RSS in MiB
    (VmHWM of its own memory, read as it exits; ru_maxrss would include this process's RSS, inherited
    through fork)."""
    start = time.time()
    proc = subprocess.run([sys.executable, "-c", PEAK, *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, env=os.environ | (env or {}))
    if proc.returncode:
        raise RuntimeError(f"dsutil {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    peak_kib = int(proc.stderr.rsplit("VmHWM", 1)[1].split()[0])
    return {"seconds": time.time() - start, "peak_rss_mib": peak_kib / 1024}


def make_folder(root: Path, classes: list[str], n: int, size: int = 64) -> None:
    """root/train/<class>/k.png (n random-pixel PNGs, classes in turn) and root/val/<class>/0.png."""
    from PIL import Image

    if (root / "done").exists():
        return
    rng = np.random.default_rng(n)
    for k in range(n):
        folder = root / "train" / classes[k % len(classes)]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{k:06d}.png")
    for c in classes:
        (root / "val" / c).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / "val" / c / "0.png")
    (root / "done").touch()


@torch.no_grad()
def bare_forward(teacher, n_batches: int = 20) -> float:
    """Images per second of the teacher alone on random 64-px batches of the relabel batch size."""
    x = torch.randn(BATCH, 3, 64, 64)
    teacher(x)
    start = time.time()
    for _ in range(n_batches):
        teacher(x)
    return n_batches * BATCH / (time.time() - start)


def bn_pass(teacher, folder: Path, workers: int) -> float:
    """Images per second of the BN-statistics pass over an ImageFolder, files decoded by ``workers``."""
    from dsutil.data import image_folder
    from dsutil.squeeze import bn_statistics, normalised_batches

    data = image_folder(folder)
    start = time.time()
    bn_statistics(teacher, normalised_batches(data, workers=workers), data.classes, "cpu")
    return len(data.train) / (time.time() - start)


def replay_rate(size: int = 224, n: int = 200) -> float:
    """Images per second one process replays (reads uint8 rows, crops, resizes, flips) at ``size`` px: what
    each DataLoader worker feeds a GPU at ImageNet resolution."""
    from dsutil.image_store import ImageSet, write_image_set
    from dsutil.relabel import RelabelConfig
    from dsutil.replay import StepBatches

    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"dsutil_bench_replay{size}.safetensors"
    pixels = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8)
    write_image_set(path, torch.zeros(n, dtype=torch.long), (3, size, size), [pixels],
                    {"classes": ["a"], "mean": [0.5] * 3, "std": [0.25] * 3})
    cfg = RelabelConfig(epochs=2, batch_size=BATCH)
    steps = [("fresh", e, b) for e in range(2) for b in range(n // BATCH)]
    batches = StepBatches(ImageSet(path), steps, cfg)
    batches[0]
    start = time.time()
    for i in range(len(steps)):
        batches[i]
    return len(steps) * BATCH / (time.time() - start)


def projection(rows: list[dict], replay_224: float) -> list[dict]:
    """ImageNet-1K (224 px, ResNet-18) at IPC 10, 50, 200 on one GPU, from measured rates: recover from the
    H100 bf16 engine (benchmarks/gpu/recover_resnet18_224_bf16_it50.json), student steps from the bare
    forward+backward there; relabel assumed at the student's rate (a forward alone is cheaper: an upper
    bound on time). Host memory: the largest measured peak here plus 56 B per image (labels, dynamics)."""
    from dsutil.labels import storage_bytes

    gpu = json.loads((ROOT / "benchmarks" / "gpu" / "recover_resnet18_224_bf16_it50.json").read_text())
    engine, bare = gpu["median_img_it_per_s"]["engine_img_it_per_s"], gpu["median_img_it_per_s"]["bare_img_it_per_s"]
    peak = max(max(r["relabel_w0"]["peak_rss_mib"], r["train"]["peak_rss_mib"]) for r in rows)
    out = []
    for ipc in (10, 50, 200):
        n = 1000 * ipc
        out.append({"ipc": ipc, "images": n, "pixels_gib": n * 3 * 224 * 224 / 2**30,
                    "labels_gib_full": storage_bytes(1000, ipc, 300, 1024) / 2**30,
                    "labels_gib_r0.975": storage_bytes(1000, ipc, 300, 1024, prune_ratio=0.975) / 2**30,
                    "host_memory_mib": peak + n * 56 / 2**20,
                    "recover_hours": n * 4000 / engine / 3600, "relabel_hours_at_most": n * 300 / bare / 3600,
                    "student_hours": n * 300 / bare / 3600,
                    "replay_workers_to_feed_gpu": bare / replay_224})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 2000, 5000, 20000])
    p.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "dsutil_bench_scale")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "bench_scale.json")
    p.add_argument("--memory-only", action="store_true",
                   help="only import, relabel (0 workers) and train in their own processes: peak memory against N")
    args = p.parse_args()
    from dsutil.recover import load_squeezed

    run_dir = args.work / "run"
    if not (run_dir / "squeeze.json").exists():
        run(["squeeze", "--dataset", "tiny-imagenet", "--num-classes", "10", "--per-class", "20", "--image-size",
             "64", "--arch", "convnet", "--width", "128", "--depth", "4", "--epochs", "1", "--batch-size", "50", "--out", str(run_dir),
             "--device", "cpu", "--restart"])
    teacher, spec, _, info = load_squeezed(run_dir)
    rows = []
    for n in args.sizes:
        folder = args.work / f"folder{n}"
        make_folder(folder, info["dataset"]["classes"], n)
        name = f"syn{n}"
        row = {"images": n, "import": run(["import", "--run", str(run_dir), "--images", str(folder / "train"),
                                           "--name", name, "--device", "cpu"])}
        for w in (0,) if args.memory_only else (0, 1):
            store = run_dir / "labels" / f"{name}-w{w}"
            shutil.rmtree(store, ignore_errors=True)  # a finished store of the same inputs would be kept as it is
            row[f"bare_forward_img_per_s_w{w}"] = bare_forward(teacher)
            row[f"relabel_w{w}"] = run(["relabel", "--run", str(run_dir), "--images", str(run_dir / "recover" / name),
                                        "--epochs", "1", "--batch-size", str(BATCH), "--workers", str(w), "--out",
                                        str(store), "--device", "cpu"])
            seconds = json.loads((store / "timing.json").read_text())["seconds"]
            row[f"relabel_w{w}"] |= {"stage_seconds": seconds, "img_per_s": n / seconds,
                                     "over_bare": n / seconds / row[f"bare_forward_img_per_s_w{w}"]}
        student = run_dir / "students" / name
        shutil.rmtree(student, ignore_errors=True)
        row["train"] = run(["train", "--run", str(run_dir), "--labels", str(run_dir / "labels" / f"{name}-w0"),
                            "--epochs", "1", "--out", str(student), "--device", "cpu"])
        epoch = json.loads((student / "metrics.jsonl").read_text().splitlines()[0])
        row["train"] |= {"epoch_seconds": epoch["seconds"], "img_per_s": n / epoch["seconds"]}
        for w in () if args.memory_only else (0, 2):
            row[f"bn_pass_img_per_s_w{w}"] = bn_pass(teacher, folder, w)
        row["image_set_mib"] = (run_dir / "recover" / name / "images.safetensors").stat().st_size / 2**20
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"command": " ".join(sys.argv), "machine": {"platform": platform.platform(), "torch": torch.__version__,
                                                          "cores": os.cpu_count(), "threads": torch.get_num_threads()},
              "teacher": spec, "rows": rows}
    if not args.memory_only:
        replay_224 = replay_rate()
        result |= {"replay_224_img_per_s_one_process": replay_224, "imagenet1k_projection": projection(rows, replay_224)}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(memory_table(result) if args.memory_only else table(result))


def markdown(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]


def memory_table(result: dict) -> str:
    return "\n".join(markdown(
        ["N", "pixels MiB", "import s", "import peak MiB", "relabel s", "relabel peak MiB", "train s", "train peak MiB"],
        [[str(r["images"]), f"{r['image_set_mib']:.0f}"] + [f"{r[k][m]:.0f}" for k in ("import", "relabel_w0", "train")
                                                           for m in ("seconds", "peak_rss_mib")]
         for r in result["rows"]]))


def table(result: dict) -> str:
    rates = markdown(
        ["N", "import s", "relabel w0 img/s", "w0 / bare", "relabel w1 img/s", "w1 / bare", "train img/s",
         "BN pass w0 img/s", "w2 img/s"],
        [[str(r["images"]), f"{r['import']['seconds']:.0f}", f"{r['relabel_w0']['img_per_s']:.0f}",
          f"{r['relabel_w0']['over_bare']:.2f}", f"{r['relabel_w1']['img_per_s']:.0f}",
          f"{r['relabel_w1']['over_bare']:.2f}", f"{r['train']['img_per_s']:.0f}",
          f"{r['bn_pass_img_per_s_w0']:.0f}", f"{r['bn_pass_img_per_s_w2']:.0f}"] for r in result["rows"]])
    projection = markdown(
        ["ImageNet-1K", "images", "pixels GiB", "labels GiB (full / r=0.975)", "host MiB", "recover h",
         "relabel h (at most)", "student h", "replay workers per GPU"],
        [[f"IPC {p['ipc']}", f"{p['images']:,}", f"{p['pixels_gib']:.1f}",
          f"{p['labels_gib_full']:.1f} / {p['labels_gib_r0.975']:.2f}", f"{p['host_memory_mib']:.0f}",
          f"{p['recover_hours']:.1f}", f"{p['relabel_hours_at_most']:.1f}", f"{p['student_hours']:.1f}",
          f"{p['replay_workers_to_feed_gpu']:.0f}"] for p in result["imagenet1k_projection"]])
    replay = f"replay at 224 px, one process: {result['replay_224_img_per_s_one_process']:.0f} images/s"
    return "\n".join([*rates, "", replay, "", *projection])


if __name__ == "__main__":
    main()
