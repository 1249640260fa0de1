"""What does fixing glibc's mmap threshold (``DSUTIL_MMAP_THRESHOLD``, ``dsutil.runtime.fix_mmap_threshold``) cost
and save?

``dsutil relabel`` (1 epoch, batch 50, 0 workers) and ``dsutil train`` (1 epoch) of the distilled sets that
``bench_scale.py`` imported, each in a fresh process, with the threshold fixed at 1 MiB (``DSUTIL_MMAP_THRESHOLD=1048576``) and with
glibc's dynamic threshold (the default), in turn (the order alternates per repeat): the
stages' own seconds (relabel's manifest, the student's epoch) and peak RSS (VmHWM).

    .venv/bin/python benchmarks/bench_scale.py --memory-only --sizes 2000 20000   # once: the run and its sets
    .venv/bin/python benchmarks/bench_malloc.py --sizes 2000 20000 --repeats 2
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_scale import BATCH, markdown, run  # noqa: E402

SETTINGS = {"fixed 1 MiB": {"DSUTIL_MMAP_THRESHOLD": "1048576"}, "glibc dynamic": {"DSUTIL_MMAP_THRESHOLD": "0"}}


def stages(run_dir: Path, n: int, env: dict) -> dict:
    """Relabel then train syn{n} once, from empty folders."""
    store, student = run_dir / "labels" / f"malloc{n}", run_dir / "students" / f"malloc{n}"
    for folder in (store, student):
        shutil.rmtree(folder, ignore_errors=True)
    relabel = run(["relabel", "--run", str(run_dir), "--images", str(run_dir / "recover" / f"syn{n}"), "--epochs", "1",
                   "--batch-size", str(BATCH), "--workers", "0", "--out", str(store), "--device", "cpu"], env)
    relabel["stage_seconds"] = json.loads((store / "timing.json").read_text())["seconds"]
    train = run(["train", "--run", str(run_dir), "--labels", str(store), "--epochs", "1", "--out", str(student),
                 "--device", "cpu"], env)
    train["stage_seconds"] = json.loads((student / "metrics.jsonl").read_text().splitlines()[0])["seconds"]
    return {"relabel": relabel, "train": train}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "dsutil_bench_scale")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "bench_malloc.json")
    args = p.parse_args()
    run_dir, rows = args.work / "run", []
    for n in args.sizes:
        if not (run_dir / "recover" / f"syn{n}" / "images.safetensors").exists():
            sys.exit(f"{run_dir}/recover/syn{n} is missing: run bench_scale.py --memory-only --sizes {n} first")
        runs = {name: [] for name in SETTINGS}
        for rep in range(args.repeats):
            for name in list(SETTINGS)[::1 if rep % 2 == 0 else -1]:
                runs[name].append(stages(run_dir, n, SETTINGS[name]))
                print(n, name, json.dumps(runs[name][-1]), flush=True)
        rows.append({"images": n, "runs": runs})
    result = {"command": " ".join(sys.argv), "machine": {"platform": platform.platform(), "cores": os.cpu_count()},
              "rows": rows}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))


def table(result: dict) -> str:
    """Median stage seconds and peak RSS per size, stage and setting; the time ratio fixed / dynamic."""
    lines = []
    for row in result["rows"]:
        for stage in ("relabel", "train"):
            med = {name: {k: statistics.median(r[stage][k] for r in runs) for k in ("stage_seconds", "peak_rss_mib")}
                   for name, runs in row["runs"].items()}
            peaks = {name: [round(r[stage]["peak_rss_mib"]) for r in runs] for name, runs in row["runs"].items()}
            lines.append([str(row["images"]), stage] + [f"{med[n]['stage_seconds']:.1f}" for n in SETTINGS] +
                         [f"{med['fixed 1 MiB']['stage_seconds'] / med['glibc dynamic']['stage_seconds']:.3f}"] +
                         [" / ".join(map(str, peaks[n])) for n in SETTINGS])
    head = (["images", "stage"] + [f"s, {n}" for n in SETTINGS] + ["fixed / dynamic"] +
            [f"peak MiB, {n}" for n in SETTINGS])
    return "\n".join(markdown(head, lines))


if __name__ == "__main__":
    main()
