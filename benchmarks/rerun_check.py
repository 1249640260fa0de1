"""Does a clean rerun of the demo give the same bytes? Runs ``dsutil demo`` twice, each into an empty folder, and
compares every file the two runs wrote: tensors, images and figures byte for byte, JSON files after dropping
what records time (seconds, finished, rates) and the folder's own path.

    .venv/bin/python benchmarks/rerun_check.py [--quick] [--keep DIR]   # full demo: about 2 x 7 minutes here

Writes benchmarks/rerun_check.json (which files differ, if any) and prints the demo's table.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIMING = ("seconds", "finished", "per_second", "loader_wait")


def without_timing(obj, root: str):
    if isinstance(obj, dict):
        return {k: without_timing(v, root) for k, v in obj.items() if not any(t in k for t in TIMING)}
    if isinstance(obj, list):
        return [without_timing(v, root) for v in obj]
    return obj.replace(root, "RUN") if isinstance(obj, str) else obj


def fingerprint(run: Path) -> dict[str, str]:
    out = {}
    for f in sorted(p for p in run.rglob("*") if p.is_file()):
        rel = str(f.relative_to(run))
        if f.suffix in (".json", ".jsonl"):
            rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()] if f.suffix == ".jsonl" \
                else json.loads(f.read_text())
            data = json.dumps(without_timing(rows, str(run)), sort_keys=True).encode()
        else:
            data = f.read_bytes()
        out[rel] = hashlib.sha256(data).hexdigest()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--keep", type=Path, default=None, help="run into DIR/a and DIR/b and keep them")
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="dsutil-rerun-"))
    prints = []
    for name in ("a", "b"):
        cmd = [sys.executable, "-m", "dsutil", "demo", "--out", str(root / name)] + (["--quick"] if args.quick else [])
        done = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
        prints.append([line for line in done.stdout.splitlines() if "stages ran" not in line])
    a, b = fingerprint(root / "a"), fingerprint(root / "b")
    differ = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    result = {"command": "dsutil demo" + (" --quick" if args.quick else ""), "files": len(a), "differ": differ,
              "same_table": prints[0] == prints[1], "table": prints[0]}
    (ROOT / "benchmarks" / f"rerun_check{'_quick' if args.quick else ''}.json").write_text(json.dumps(result, indent=1) + "\n")
    print("\n".join(prints[0]))
    print(f"{len(a)} files; {len(differ)} differ" + (f": {differ[:10]}" if differ else " (the same bytes)"))


if __name__ == "__main__":
    main()
