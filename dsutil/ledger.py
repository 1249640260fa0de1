"""The ledger of published numbers (``docs/ledger.json``): every number the README and docs/ tables quote, with the
command that makes it, its spread and seeds, the machine and commit it was measured on, and a tolerance.

The tables are generated from it (``dsutil ledger tables``), never typed, and ``dsutil ledger check`` reruns the
commands that fit a time budget and says of each number whether it holds (the same value), moved (within its
tolerance: another CPU's vector kernels give other sums) or broke.
"""
from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from .files import read_json, write_json

LEDGER = Path(__file__).resolve().parent.parent / "docs" / "ledger.json"
# how far a number may move on another machine and stay "moved", not "broken": a student's top-1 moves with the
# last bits of its sums by about a seed's spread; a cosine by less; a stage time with the machine's load
TOLERANCE = {"top1": 0.03, "cosine": 0.02, "lrs": 0.05, "seconds_ratio": 1.0, "bytes": 0}
# the runs the README and docs/ quote: the command that makes each, from an empty folder given as {out}
RUNS = {"mnist5k": "dsutil run mnist5k --out {out}", "tiny-imagenet-10": "dsutil run tiny-imagenet-10 --out {out}"}
# `dsutil labels size` settings the docs quote: quick, so CI checks them
SIZES = {"imagenet1k-ipc10": "--classes 1000 --ipc 10 --epochs 300",
         "imagenet1k-ipc10-r0.975": "--classes 1000 --ipc 10 --epochs 300 --prune-ratio 0.975 --image-size 224",
         "imagenet1k-ipc200": "--classes 1000 --ipc 200 --epochs 300"}


def run_entries(name: str, summary: dict) -> list[dict]:
    """The ledger's entries of one run, read from its summary: the teacher, the full-real number, each set's cosine,
    hard-label top-1, and top-1 and LRS at each ratio, and the run's stage time."""
    seeds, prov = summary["seeds"], summary.get("provenance") or {}
    common = {"command": RUNS[name], "run": name, "seeds": seeds,
              "machine": {k: prov.get(k) for k in ("cpu", "cpu_vector", "gpu", "torch", "python")},
              "commit": prov.get("commit"), "dirty": prov.get("dirty"), "date": prov.get("date")}
    out = [{"id": f"{name}/teacher/top1", "read": ["teacher", "test_top1"], "value": summary["teacher"]["test_top1"],
            "kind": "top1"}]
    if summary.get("full_real_hard_label"):
        out.append({"id": f"{name}/full-real-hard/top1", "read": ["full_real_hard_label", "test_top1"],
                    "value": summary["full_real_hard_label"]["test_top1"], "kind": "top1"})
    out.append({"id": f"{name}/real-all/cosine", "read": ["real_within_class_cosine"],
                "value": summary["real_within_class_cosine"], "kind": "cosine"})
    for method, m in summary["methods"].items():
        out.append({"id": f"{name}/{method}/cosine", "read": ["methods", method, "within_class_cosine"],
                    "value": m["within_class_cosine"], "kind": "cosine"})
        if m.get("hard_label"):
            out.append(_spread(f"{name}/{method}/hard/top1", ["methods", method, "hard_label"], m["hard_label"]))
        for s in m["students"]:
            at = ["methods", method, "students", {"prune_ratio": s["prune_ratio"], "metric": s["metric"]}]
            tag = f"{name}/{method}/{s['metric']}/r={s['prune_ratio']:g}"
            out.append(_spread(f"{tag}/top1", at, s))
            if s.get("scores"):
                out.append({"id": f"{tag}/lrs", "read": [*at, "scores", "lrs"], "value": s["scores"]["lrs"],
                            "kind": "lrs"})
    out.append({"id": f"{name}/stage-seconds", "read": ["stage_seconds"], "value": stage_seconds(summary),
                "kind": "seconds_ratio"})
    return [common | e for e in out]


def _spread(entry_id: str, at: list, point: dict) -> dict:
    return {"id": entry_id, "read": [*at, "test_top1"], "value": point["test_top1"], "std": point.get("test_top1_std"),
            "per_seed": point.get("test_top1_per_seed"), "kind": "top1"}


def stage_seconds(summary: dict) -> float | None:
    """The run's time as its stages first measured it (a rerun that reuses them reports that time, not its own)."""
    values = list(summary["stage_seconds"].values())
    return None if any(v is None for v in values) else round(sum(values), 1)


def size_entries() -> list[dict]:
    """The ledger's ``dsutil labels size`` entries, computed now (instant: CI checks them)."""
    out = []
    for name, flags in SIZES.items():
        got = _labels_size(flags)
        for key in ("bytes", "total_bytes"):
            if key in got:
                out.append({"id": f"labels-size/{name}/{key}", "command": f"dsutil labels size {flags} --json",
                            "flags": flags, "read": [key], "value": got[key], "kind": "bytes", "quick": True})
    return out


def _labels_size(flags: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "dsutil", "labels", "size", *shlex.split(flags), "--json"],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def read(doc, path: list):
    """The value at ``path`` in a summary: keys, and for lists a mapping that picks the item it matches."""
    for step in path:
        doc = next(x for x in doc if all(x.get(k) == v for k, v in step.items())) if isinstance(step, dict) else doc[step]
    return doc


def value_of(entry: dict, summary: dict):
    return stage_seconds(summary) if entry["kind"] == "seconds_ratio" else read(summary, entry["read"])


def record(runs_dir, ledger=LEDGER, names=None) -> dict:
    """The ledger made from the runs' summaries under ``runs_dir`` (``<runs_dir>/<name>/summary.json``) and the
    size entries; the entries of runs not named keep their recorded values."""
    old = read_json(ledger)["entries"] if Path(ledger).exists() else []
    names = list(RUNS) if names is None else names
    entries = [e for e in old if e.get("run") not in (*names, None)]
    for name in names:
        entries += run_entries(name, read_json(Path(runs_dir) / name / "summary.json"))
    doc = {"about": "every number the README's and docs/' tables quote; made by `dsutil ledger record`, checked by "
                    "`dsutil ledger check` (docs/ledger.md)", "tolerance": TOLERANCE,
           "entries": entries + size_entries()}  # in each run's own order: the tables follow it
    write_json(ledger, doc)
    return doc


def verdict(entry: dict, value) -> str:
    """holding (the same value), moved (within the tolerance of its kind) or broken."""
    want = entry["value"]
    if value == want:
        return "holding"
    if value is None or want is None:
        return "broken"
    off = abs(value / want - 1) if entry["kind"] == "seconds_ratio" else abs(value - want)
    return "moved" if off <= TOLERANCE[entry["kind"]] else "broken"


def check(ledger=LEDGER, budget: float = 0.0, runs_dir=None, quick: bool = False) -> list[dict]:
    """Rerun every run whose recorded stage time fits ``budget`` seconds (``quick``: none) from an empty folder (or
    into ``runs_dir/<name>``, reusing what is finished there), and every quick entry, and compare each entry. One row
    per entry: its id, recorded and new value, and holding, moved, broken or skipped (beyond the budget)."""
    by_run: dict = {}
    for e in read_json(ledger)["entries"]:
        by_run.setdefault(e.get("run"), []).append(e)
    rows = [_row(e, read(_labels_size(e["flags"]), e["read"])) for e in by_run.pop(None, [])]
    for name, group in by_run.items():
        cost = next((e["value"] for e in group if e["kind"] == "seconds_ratio"), None)
        if quick or cost is None or cost > budget:
            rows += [_row(e, None, "skipped") for e in group]
            continue
        summary = _rerun(name, runs_dir)
        rows += [_row(e, value_of(e, summary)) for e in group]
    return rows


def _rerun(name: str, runs_dir) -> dict:
    if runs_dir is not None:
        return _run(name, Path(runs_dir) / name)
    with tempfile.TemporaryDirectory(prefix=f"ledger-{name}-") as tmp:
        return _run(name, Path(tmp) / name)


def _run(name: str, out: Path) -> dict:
    subprocess.run([sys.executable, "-m", "dsutil", *shlex.split(RUNS[name].format(out=out))[1:]], check=True)
    return read_json(out / "summary.json")


def _row(entry: dict, value, status: str | None = None) -> dict:
    return {"id": entry["id"], "recorded": entry["value"], "now": value, "status": status or verdict(entry, value)}


TABLE = re.compile(r"(<!-- ledger: (?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- /ledger -->)", re.S)
DOCS = ("README.md", "docs/results.md")  # the files whose ledger tables `dsutil ledger tables` writes


def table(entries: list[dict], name: str) -> str:
    """The markdown of one run's numbers: top-1 (%, mean ± std over seeds) of each set on hard labels and at each
    pruning ratio, its cosine, its LRS, and a line of what they were measured with."""
    from .plots import METHOD_NAMES

    got = {e["id"][len(name) + 1:]: e for e in entries if e.get("run") == name}
    methods = list(dict.fromkeys(k.split("/")[0] for k in got if k.endswith("/cosine") and not k.startswith("real-all")))
    ratios = sorted({float(k.split("/r=")[1].split("/")[0]) for k in got if "/random/r=" in k}, key=float)
    pct = lambda e: "n/a" if e is None else f"{e['value'] * 100:.1f}" + (  # noqa: E731
        f" ± {e['std'] * 100:.1f}" if e.get("std") is not None else "")
    hard = any(f"{m}/hard/top1" in got for m in methods)
    head = ["method", "within-class cosine", *(["hard labels"] if hard else []), *(f"r = {r:g}" for r in ratios)]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for m in methods:
        cells = [METHOD_NAMES.get(m, m), f"{got[f'{m}/cosine']['value']:.3f}",
                 *([pct(got.get(f"{m}/hard/top1"))] if hard else []),
                 *(pct(got.get(f"{m}/random/r={r:g}/top1")) for r in ratios)]
        lines.append("| " + " | ".join(cells) + " |")
    scored = [m for m in methods if any(f"{m}/random/r={r:g}/lrs" in got for r in ratios) and m != "real"]
    if scored:
        lines += ["", "| LRS (x 100) | " + " | ".join(f"r = {r:g}" for r in ratios) + " |",
                  "|" + " --- |" * (len(ratios) + 1)]
        for m in scored:
            cells = [f"{got[f'{m}/random/r={r:g}/lrs']['value'] * 100:.1f}" if f"{m}/random/r={r:g}/lrs" in got
                     else "n/a" for r in ratios]
            lines.append(f"| {METHOD_NAMES.get(m, m)} | " + " | ".join(cells) + " |")
    first = next(iter(got.values()))
    mach, commit, seconds = first["machine"], first["commit"], got["stage-seconds"]["value"]
    said = [f"Top-1 (%) on the held-out images, mean ± std over seeds {first['seeds']}",
            f"teacher {got['teacher/top1']['value']:.1%}" + (" (also the whole real training set on hard labels, "
                                                              "docs/protocol.md)" if "full-real-hard/top1" in got else ""),
            f"all real training images: cosine {got['real-all/cosine']['value']:.3f}",
            *([f"stages {seconds / 60:.0f} min"] if seconds else []),
            f"measured at {commit[:7] if commit else 'an installed dsutil'}"
            f"{' (with uncommitted changes)' if first.get('dirty') else ''} on {mach['cpu']} "
            f"({', '.join(mach['cpu_vector'])}), torch {mach['torch']}, {(first['date'] or '')[:10]}"]
    lines += ["", "; ".join(said) + ". Made from `docs/ledger.json` by `dsutil ledger tables`."]
    return "\n".join(lines) + "\n"


def write_tables(root=LEDGER.parent.parent, ledger=LEDGER, check_only: bool = False) -> list[str]:
    """Rewrite every ``<!-- ledger: NAME -->`` block of DOCS from the ledger; the files that were (``check_only``:
    would be) changed."""
    entries = read_json(ledger)["entries"]
    changed = []
    for doc in DOCS:
        path = Path(root) / doc
        text = path.read_text()
        new = TABLE.sub(lambda m: m.group(1) + table(entries, m.group("name")) + m.group(4), text)
        if new != text:
            changed.append(doc)
            if not check_only:
                path.write_text(new)
    return changed
