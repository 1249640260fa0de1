"""Does reading soft labels from the store slow student training down?

The claim under test: steps per second when the student trains from a label
store are at least 0.9 of those when it trains on the same batches held in
memory. Three loops run the same student (same initial weights, optimizer,
loss and steps) over the same schedule of stored batches, in one process,
alternating over several repeats:

* ``store``: as ``dsutil.train.train_student`` does it: one
  ``DataLoader(StoredBatches(...), batch_size=None)`` per student epoch, which
  opens the store, reads each batch's slice of its epoch file and replays the
  crops / flips / mixes from the distilled images;
* ``replay``: the records already read into memory, replayed on the fly
  (splits the cost of reading from the cost of replaying);
* ``memory``: the replayed batches and their logits precomputed into a list of
  tensors (no reading, no replay): the reference.

The ratio ``store / memory`` is the claim's number. Run on this machine's CPU
by default:

    .venv/bin/python benchmarks/bench_label_store.py            # makes a small MNIST-5k run in /tmp
    .venv/bin/python benchmarks/bench_label_store.py --run RUN  # reuses a run with squeeze outputs

Results are printed as a table and written as JSON (``--out``, default next to
this script). ``benchmarks/README.md`` records a run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import statistics
import tempfile
import time
from pathlib import Path

import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, default=None,
                   help="run directory with squeeze outputs (default: make one with `squeeze` on mnist5k)")
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "dsutil_bench_label_store",
                   help="where the default run is made and kept for later runs of this script")
    p.add_argument("--method", default="lpld", help="recover method of the distilled images (or `real`)")
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--iterations", type=int, default=100, help="recover iterations")
    p.add_argument("--relabel-epochs", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--mix", default="cutmix", choices=["none", "cutmix", "mixup"])
    p.add_argument("--student-epochs", type=int, default=None, help="timed student epochs (default: relabel epochs)")
    p.add_argument("--width", type=int, default=64, help="student ConvNet width")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1], help="DataLoader workers for `store`")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats of every loop (after one warm-up)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".json"))
    return p.parse_args(argv)


def make_run(args) -> tuple[Path, Path, Path]:
    """The run, its distilled images and label store; each made only if absent."""
    from dsutil.recover import RecoverConfig, recover, recover_dir
    from dsutil.relabel import RelabelConfig, relabel

    run = args.run
    if run is None:
        run = args.workdir / "run"
        if not (run / "teacher.safetensors").exists():
            from dsutil.data import load_dataset
            from dsutil.squeeze import TeacherConfig, squeeze

            print(f"squeeze mnist5k -> {run}")
            squeeze(load_dataset("mnist5k"), run, TeacherConfig(), device=args.device, progress=False)
    images = recover_dir(run, args.method, args.ipc)
    if not (images / "images.safetensors").exists():
        print(f"recover {args.method} ipc {args.ipc} -> {images}")
        recover(run, RecoverConfig(method=args.method, ipc=args.ipc, iterations=args.iterations, r_bn=0.1),
                device=args.device, progress=False)
    cfg = RelabelConfig(epochs=args.relabel_epochs, batch_size=args.batch_size, mix=args.mix)
    store = relabel(run, images, cfg, device=args.device, progress=False)  # resumes: a no-op when done
    return run, images, store


class Trainer:
    """The student's training step of ``train_student``: ConvNet, AdamW, cosine schedule, KD loss at T = 4."""

    def __init__(self, make_student, steps: int, device):
        self.student, self.device = make_student(), device
        self.opt = torch.optim.AdamW(self.student.parameters(), 1e-3, weight_decay=0.01)
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, steps)
        self.student.train()

    def epoch(self, make_batches) -> tuple[float, int]:
        """Seconds and steps of one student epoch, making its batch iterable (a DataLoader) included."""
        from dsutil.train import kd_loss

        steps, start = 0, time.perf_counter()
        for x, target in make_batches():
            loss = kd_loss(self.student(x.to(self.device)), target.to(self.device), 4.0, False)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.sched.step()
            steps += 1
        loss.detach().item()  # wait for the last step
        return time.perf_counter() - start, steps


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from torch.utils.data import DataLoader

    from dsutil.labels import LabelStore
    from dsutil.models import build_model
    from dsutil.recover import load_images
    from dsutil.relabel import replay
    from dsutil.train import StoredBatches, batch_schedule

    device = torch.device(args.device)
    run, images_dir, store_path = make_run(args)
    images = load_images(images_dir)[0]
    store = LabelStore(store_path)
    store.check_images(images_dir / "images.safetensors")
    m = store.manifest
    epochs = args.student_epochs or m["epochs"]
    schedule = batch_schedule(store.keys(), epochs, m["batches_per_epoch"], "batch", seed=0)
    steps = sum(len(s) for s in schedule)
    records = {k: store.read(*k) for k in store.keys()}
    memory = [[(replay(images, records[k]), records[k].logits) for k in s] for s in schedule]

    c, h = images.shape[1], images.shape[2]
    torch.manual_seed(0)
    init = build_model("convnet", store.num_classes, c, h, width=args.width).state_dict()

    def student():
        model = build_model("convnet", store.num_classes, c, h, width=args.width)
        model.load_state_dict(init)
        return model.to(device)

    loops = {"memory": lambda e: iter(memory[e]),
             "replay": lambda e: ((replay(images, records[k]), records[k].logits) for k in schedule[e])}
    for w in args.workers:  # as train_student: a fresh loader (and store handle) per student epoch
        loops[f"store-w{w}"] = lambda e, w=w: DataLoader(StoredBatches(store.path, images, schedule[e]),
                                                         batch_size=None, num_workers=w, persistent_workers=False)
    names = list(loops)
    times = {name: [] for name in names}
    for rep in range(args.repeats + 1):  # repeat 0 warms up and is not counted
        trainers = {name: Trainer(student, steps, device) for name in names}
        seconds, done = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0)
        for e in range(epochs):  # epoch by epoch, in turn (rotating who goes first): load changes hit all alike
            for name in names[e % len(names):] + names[:e % len(names)]:
                t, n = trainers[name].epoch(lambda: loops[name](e))
                seconds[name] += t
                done[name] += n
        assert all(n == steps for n in done.values()), done
        if rep:
            for name in names:
                times[name].append(seconds[name])
    rate = {name: [steps / t for t in times[name]] for name in names}
    # paired per repeat: this loop's rate over the memory loop's rate in the same repeat
    ratio = {name: [m / t for m, t in zip(times["memory"], times[name])] for name in names}
    rows = {name: {"steps_per_second_median": statistics.median(rate[name]), "steps_per_second_min": min(rate[name]),
                   "steps_per_second_max": max(rate[name]), "ratio_to_memory_median": statistics.median(ratio[name]),
                   "ratio_to_memory_min": min(ratio[name]), "ratio_to_memory_max": max(ratio[name])}
            for name in names}
    result = {
        "command": "benchmarks/bench_label_store.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "device": str(device), "load_average_at_end": os.getloadavg()},
        "setting": {"run": str(run), "images": str(images_dir), "store": str(store.path),
                    "num_images": m["num_images"], "classes": store.num_classes, "batch_size": m["batch_size"],
                    "mix": m["augmentation"]["mix"], "relabel_epochs": m["epochs"], "student_epochs": epochs,
                    "steps": steps, "student_width": args.width, "repeats": args.repeats,
                    "store_disk_bytes": store.disk_bytes()},
        "results": rows,
    }
    print(f"{steps} steps of batch {m['batch_size']} ({epochs} student epochs of {m['batches_per_epoch']} steps), "
          f"ConvNet-{args.width}, {torch.get_num_threads()} threads, {device}, median of {args.repeats} repeats")
    print(f"{'loop':<10} {'steps/s':>9} {'min':>9} {'max':>9} {'/ memory':>9} {'min':>7} {'max':>7}")
    for name, row in rows.items():
        print(f"{name:<10} {row['steps_per_second_median']:9.1f} {row['steps_per_second_min']:9.1f} "
              f"{row['steps_per_second_max']:9.1f} {row['ratio_to_memory_median']:9.3f} "
              f"{row['ratio_to_memory_min']:7.3f} {row['ratio_to_memory_max']:7.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {args.out}")
    return result


if __name__ == "__main__":
    main()
