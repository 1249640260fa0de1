"""Does the data path keep the device busy? Relabel and student training as the stages run them (batches
read and replayed in DataLoader workers) against the same batches already held on the device.

ResNet-18 at 64 px (the Tiny-ImageNet teacher and student) on N synthetic distilled images (random
pixels: the speed does not depend on them) of 200 classes:

* ``relabel``: :func:`dsutil.relabel.relabel` (its whole stage: replay, teacher, epoch files) with W
  replay workers, against the teacher's forward alone over the same replayed batches held on the device;
* ``train``: :func:`dsutil.train.train_student` (KD steps, dynamics, its checkpoints) with W
  workers, against forward + backward + AdamW steps over the same batches and logits held on the device.

``over_held`` is the stage's steps per second over the held loop's (>= 0.9: the device waits for data
at most 10% of the time). Both stages also record ``loader_wait_seconds``, the time their loop spent
waiting for the next batch: an upper bound on the device's idle time for data.

    python benchmarks/bench_loader.py --device cuda --images 5000 --epochs 3 --workers 0 4 8
    python benchmarks/bench_loader.py --device cpu --images 200 --epochs 1 --workers 0 1   # a check of the script
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
CLASSES = 200


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_run(work: Path, n: int, device: torch.device) -> tuple[Path, Path]:
    """A run whose teacher is an untrained ResNet-18 (squeezed over a 400-image synthetic folder) and a
    synthetic distilled set of ``n`` uint8 images in RUN/recover/syn{n}."""
    from bench_scale import make_folder

    from dsutil.data import load_dataset
    from dsutil.files import save_model
    from dsutil.image_store import write_image_set
    from dsutil.models import build_model
    from dsutil.squeeze import squeeze

    run = work / "run"
    classes = [f"c{k:03d}" for k in range(CLASSES)]
    if not (run / "squeeze.json").exists():
        make_folder(work / "folder", classes, 2 * CLASSES)
        spec = {"arch": "resnet18", "num_classes": CLASSES, "in_channels": 3, "image_size": 64}
        torch.manual_seed(0)
        save_model(work / "teacher.safetensors", build_model(**spec), spec)
        data = load_dataset("imagefolder", work / "folder", image_size=64)
        squeeze(data, run, device=str(device), progress=False, teacher_checkpoint=work / "teacher.safetensors",
                restart=True, workers=0)
    images = run / "recover" / f"syn{n}"
    if not (images / "images.safetensors").exists():
        info = json.loads((run / "squeeze.json").read_text())["dataset"]
        gen = torch.Generator().manual_seed(n)
        rows = (torch.randint(0, 256, (min(500, n - s), 3, 64, 64), dtype=torch.uint8, generator=gen)
                for s in range(0, n, 500))
        write_image_set(images / "images.safetensors", torch.arange(n) % CLASSES, (3, 64, 64), rows,
                        {"classes": info["classes"], "method": "synthetic", "ipc": n // CLASSES,
                         "mean": info["mean"], "std": info["std"]})
    return run, images


def held_batches(images: Path, steps: list, cfg, store, device) -> list:
    """Every step's (replayed images, stored logits) on the device, as the stage's loader yields them."""
    from dsutil.image_store import ImageSet
    from dsutil.replay import StepBatches

    batches = StepBatches(ImageSet(images / "images.safetensors"), steps, cfg, store)
    return [(x.to(device), None if logits is None else logits.to(device).float())
            for x, logits, *_ in (batches[i] for i in range(len(steps)))]


@torch.no_grad()
def held_relabel(run: Path, batches: list, device) -> float:
    """Seconds of the teacher's forward over batches held on the device."""
    from dsutil.recover import load_squeezed

    teacher = load_squeezed(run, device)[0]
    teacher(batches[0][0])
    sync(device)
    start = time.perf_counter()
    for x, _ in batches:
        teacher(x)
    sync(device)
    return time.perf_counter() - start


def held_train(run: Path, batches: list, device) -> float:
    """Seconds of the student's training steps (ResNet-18, AdamW, KD at T = 4) over batches on the device."""
    from dsutil.models import build_model
    from dsutil.train import kd_loss

    student = build_model("resnet18", CLASSES, 3, 64).to(device).train()
    opt = torch.optim.AdamW(student.parameters(), 1e-3, weight_decay=0.01)
    sync(device)
    start = time.perf_counter()
    for x, logits in batches:
        loss = kd_loss(student(x), logits, 4.0, False)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sync(device)
    return time.perf_counter() - start


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--images", type=int, default=5000, help="distilled images (N)")
    p.add_argument("--epochs", type=int, default=3, help="relabel and student epochs")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 4, 8], help="replay workers of the stages")
    p.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "dsutil_bench_loader")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "bench_loader.json")
    args = p.parse_args(argv)
    from dsutil.labels import LabelStore
    from dsutil.relabel import RelabelConfig, relabel
    from dsutil.train import StudentConfig, train_student

    device = torch.device(args.device)
    run, images = make_run(args.work, args.images, device)
    cfg = RelabelConfig(epochs=args.epochs, batch_size=args.batch_size, mix="cutmix")
    rows, store = [], None
    for w in args.workers:
        store = run / "labels" / f"w{w}"
        shutil.rmtree(store, ignore_errors=True)
        relabel(run, images, cfg, out=store, device=str(device), progress=False, workers=w)
        m = LabelStore(store).manifest | json.loads((store / "timing.json").read_text())  # seconds, loader wait
        steps = m["epochs"] * m["batches_per_epoch"]
        student = run / "students" / f"w{w}"
        shutil.rmtree(student, ignore_errors=True)
        train_student(run, store, StudentConfig(arch="resnet18", epochs=args.epochs, workers=w), student,
                      str(device), progress=False)
        epochs = [json.loads(line) for line in (student / "metrics.jsonl").read_text().splitlines()]
        train_seconds = epochs[-1]["seconds"]  # the loop's, from its start to the last epoch's checkpoint
        rows.append({"workers": w, "steps": steps,
                     "relabel": {"seconds": m["seconds"], "loader_wait_seconds": m["loader_wait_seconds"],
                                 "steps_per_s": steps / m["seconds"]},
                     "train": {"seconds": train_seconds,
                               "loader_wait_seconds": sum(e["loader_wait_seconds"] for e in epochs),
                               "steps_per_s": steps / train_seconds}})
        print(json.dumps(rows[-1]), flush=True)
    # the held loops, over the batches of the last store (every store holds the same draws)
    keys = LabelStore(store).keys()
    relabel_held = held_batches(images, [("fresh", e, b) for e, b in keys], cfg, None, device)
    held = {"relabel": len(keys) / held_relabel(run, relabel_held, device)}
    del relabel_held
    held["train"] = len(keys) / held_train(run, held_batches(images, [("stored", e, b) for e, b in keys], cfg,
                                                              store, device), device)
    for row in rows:
        for stage in ("relabel", "train"):
            r = row[stage]
            r |= {"held_steps_per_s": held[stage], "over_held": r["steps_per_s"] / held[stage],
                  "loader_wait_fraction": r["loader_wait_seconds"] / r["seconds"]}
    result = {"command": "benchmarks/bench_loader.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "machine": {"platform": platform.platform(), "torch": torch.__version__, "cores": os.cpu_count(),
                          "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"},
              "setting": {"model": "resnet18", "image_size": 64, "classes": CLASSES, "images": args.images,
                          "epochs": args.epochs, "batch_size": args.batch_size, "mix": "cutmix"},
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))
    return result


def table(result: dict) -> str:
    lines = ["| stage | workers | steps/s | held steps/s | over held | loader wait |", "|" + " --- |" * 6]
    for row in result["rows"]:
        for stage in ("relabel", "train"):
            r = row[stage]
            lines.append(f"| {stage} | {row['workers']} | {r['steps_per_s']:.2f} | {r['held_steps_per_s']:.2f} | "
                         f"{r['over_held']:.2f} | {100 * r['loader_wait_fraction']:.1f}% |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
