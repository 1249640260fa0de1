"""Every notebook executed on a full-size run (a `rehearsal.py` run of `tiny-imagenet`: 200 classes, real JPEGs), with
the peak memory of its kernel: the notebooks read a run's files and stream the data, so the kernel's memory
does not follow the training set.

The run's own config.json is the notebooks' preset (a JSON file is YAML), with a small frontier section added
for notebook 06 (the `tiny-imagenet` preset has none); COMPUTE is on, so what a notebook adds (03's students,
06's frontier) is made in the run. Per notebook: wall seconds, the kernel's peak RSS (VmHWM, printed by a last
cell) and the peak PSS of the kernel's process tree (loader workers included), sampled every 0.2 s.

    .venv/bin/python benchmarks/notebooks_full_size.py --quick --runs /tmp/dsutil_rehearsal/tiny-25000 /tmp/dsutil_rehearsal/tiny-100000
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

import nbformat

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rehearsal import tree_pss_mib  # noqa: E402

from dsutil.notebook import headless  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FRONTIER = {"methods": ["lpld"], "curve_ratios": [0.0], "prune_ratios": [0.975], "topk": [None, 2], "topk_fill": "mass",
            "policies": {"constant": {}}, "seeds": [0]}
PEAK_CELL = "print('VmHWM', open('/proc/self/status').read().split('VmHWM:')[1].split()[0])"


def run_notebook(path: Path, run: Path, preset: Path, quick: bool) -> dict:
    nb = nbformat.read(path, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(PEAK_CELL))
    os.environ.update({"DSUTIL_PRESET": str(preset), "DSUTIL_RUN": str(run), "DSUTIL_COMPUTE": "1",
                       "DSUTIL_QUICK": "1" if quick else "0", "DSUTIL_FIGURES": str(run / "figures-notebooks")})
    client = headless(nb, ROOT / "notebooks", timeout=None)
    peak, start = [0.0], time.time()
    with client.setup_kernel():
        pid = client.km.provisioner.process.pid  # the kernel process

        def sample():
            while client.kc is not None and not stop.is_set():
                peak[0] = max(peak[0], tree_pss_mib(pid))
                time.sleep(0.2)
        stop = threading.Event()
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            for i, cell in enumerate(nb.cells):
                client.execute_cell(cell, i)
        finally:
            stop.set()
            sampler.join()
    text = "".join(o.get("text", "") for o in nb.cells[-1].outputs)
    return {"notebook": path.stem, "seconds": round(time.time() - start, 1),
            "kernel_peak_rss_mib": round(int(text.split("VmHWM")[1].split()[0]) / 1024, 1),
            "kernel_tree_peak_pss_mib": round(peak[0], 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=Path, nargs="+", required=True, help="finished rehearsal runs")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "notebooks_full_size.json")
    p.add_argument("--quick", action="store_true", help="QUICK = True: the notebooks' own extra work at its smallest "
                   "(the run's settings stay: a run's config.json has no quick: section)")
    args = p.parse_args()
    result = {"command": " ".join(sys.argv), "quick": args.quick, "frontier": FRONTIER, "runs": []}
    for run in args.runs:
        config = json.loads((run / "config.json").read_text())
        preset = run / "notebook-preset.json"
        preset.write_text(json.dumps(config | {"frontier": FRONTIER}, indent=1))
        summary = json.loads((run / "summary.json").read_text())
        entry = {"run": str(run), "classes": len(summary["classes"]),
                 "train_images": len(summary["classes"]) * config["data"]["per_class"], "notebooks": []}
        result["runs"].append(entry)
        for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
            entry["notebooks"].append(run_notebook(path, run, preset, args.quick))
            print(json.dumps(entry["notebooks"][-1]), flush=True)
            args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
