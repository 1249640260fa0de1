"""Does a clean rerun give the same bytes? Runs ``dsutil demo`` (or ``dsutil run PRESET``) twice, each into an
empty folder, and compares every file the two runs wrote: tensors, images and figures byte for byte, JSON files
after dropping what records time (seconds, started, finished, rates) and the folder's own path.

With ``--against COMMIT`` the first run is made by the code of COMMIT (a git worktree of it), so the check says
whether a change moved any result; then the current code reruns on a copy of that first run, which should
reuse every stage it finished.

    .venv/bin/python benchmarks/rerun_check.py [--quick] [--keep DIR]   # full demo: about 2 x 7 minutes here
    .venv/bin/python benchmarks/rerun_check.py --against d39a235        # the code of d39a235 against this one

Writes benchmarks/rerun_check[_PRESET][_quick][_against_COMMIT].json (which files differ, if any) and prints the demo's table.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIMING = ("seconds", "started", "finished", "per_second", "loader_wait")


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


def dsutil_command(code: Path, args: list[str]) -> list[str]:
    """Run ``python -m dsutil ARGS`` with the package at ``code``; its printed lines."""
    env = os.environ | {"PYTHONPATH": str(code)}
    done = subprocess.run([sys.executable, "-m", "dsutil", *args], cwd=code, env=env, check=True, capture_output=True,
                          text=True)
    return done.stdout.splitlines()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--preset", default=None, help="dsutil run PRESET instead of dsutil demo")
    parser.add_argument("--against", default=None, help="a commit whose code makes the first run")
    parser.add_argument("--keep", type=Path, default=None, help="run into DIR/a and DIR/b and keep them")
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="dsutil-rerun-"))
    command = (["run", args.preset] if args.preset else ["demo"]) + (["--quick"] if args.quick else [])
    codes = {"a": ROOT, "b": ROOT}
    if args.against:
        codes["a"] = ROOT.parent / f"dsutil-{args.against}"  # beside this checkout: ../shared is found alike
        if not codes["a"].exists():
            subprocess.run(["git", "worktree", "add", "--detach", str(codes["a"]), args.against], cwd=ROOT, check=True)
    prints = [[line for line in dsutil_command(codes[name], [*command, "--out", str(root / name)])
               if "stages ran" not in line] for name in ("a", "b")]
    a, b = fingerprint(root / "a"), fingerprint(root / "b")
    differ = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    top1 = [{m: [st["test_top1_per_seed"] for st in v["students"]] for m, v in
             json.loads((root / name / "summary.json").read_text())["methods"].items()} for name in ("a", "b")]
    result = {"command": "dsutil " + " ".join(command), "against": args.against, "files": len(a), "differ": differ,
              "tensors_images_figures_differ": [k for k in differ if not k.endswith((".json", ".jsonl"))],
              "same_student_top1_per_seed": top1[0] == top1[1], "same_table": prints[0] == prints[1],
              "table": prints[0]}
    if args.against:  # the current code on a copy of the old run: every finished stage reused
        shutil.copytree(root / "a", root / "c", dirs_exist_ok=True)
        result["rerun_on_the_old_run"] = next(line for line in dsutil_command(ROOT, [*command, "--out", str(root / "c")])
                                              if "stages ran" in line)
        subprocess.run(["git", "worktree", "remove", "--force", str(codes["a"])], cwd=ROOT, check=True)
    name = "rerun_check" + ("_" + args.preset if args.preset else "") + ("_quick" if args.quick else "") + \
        (f"_against_{args.against}" if args.against else "")
    (ROOT / "benchmarks" / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    print("\n".join(prints[0]))
    print(f"{len(a)} files; {len(differ)} differ" + (f": {differ[:10]}" if differ else " (the same bytes)"))
    if args.against:
        print("the current code on the old run:", result["rerun_on_the_old_run"])


if __name__ == "__main__":
    main()
