"""The storage-accuracy frontier: pruning ratio x top-k x student policy, per method, with seeds.

Pruning alone (LPLD) is one curve through the space of label budgets. Top-k storage, temperature
schedules and hard/soft mixing are other ways to spend the same bytes; this experiment trains every
combination on the run's images and keeps the settings no cheaper setting beats (the Pareto frontier).
"""
from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

from .files import write_json
from .layout import frontier_student_dir, recover_dir
from .protocol import image_bytes
from .runner import Stages, ensure_labels, ensure_run, ensure_student, over_seeds
from .runtime import is_main
from .settings import build, require


def run_frontier(cfg, out, progress: bool = True) -> dict:
    """Train the frontier of ``cfg.frontier`` on the run in ``out`` (made first when missing); write
    ``frontier.json`` with one point per setting (mean, std and per-seed top-1) and the Pareto points."""
    fcfg = cfg.frontier
    require(fcfg is not None, "frontier", None, "a frontier: section in the preset")
    ensure_run(cfg, out, progress)
    out, stages, data = Path(out), Stages(progress), cfg.data.load()
    points = []
    for method in fcfg.methods:
        ipc = cfg.recover_config(method).ipc
        full, stored_images = None, image_bytes(recover_dir(out, method, ipc) / "images.safetensors")
        for r, k, policy in fcfg.settings():
            rcfg = replace(cfg.relabel, topk=k, topk_fill=fcfg.topk_fill)
            store = ensure_labels(out, method, ipc, rcfg, cfg.device, progress, stages)
            scfg = build(type(cfg.student), asdict(cfg.student) | fcfg.policies[policy] | {"prune_ratio": r},
                         f"frontier policy {policy!r}")
            runs = [ensure_student(out, method, replace(scfg, seed=seed), ipc, cfg.device, data, progress, stages,
                                   store=store, folder=frontier_student_dir(out, method, ipc, k, r, policy, seed)) for seed in fcfg.seeds]
            point = {"method": method, "prune_ratio": r, "topk": k, "policy": policy} | over_seeds(runs, fcfg.seeds)
            point["total_bytes"] = stored_images + point["label_bytes"]  # what sets of other images compare at
            if (r, k, policy) == (0.0, None, "constant"):
                full = point["label_bytes"]
            points.append(point)
        for p in points:
            if p["method"] == method and full:
                p["reduction"] = full / p["label_bytes"] if p["label_bytes"] else None
    result = {"name": cfg.name, "frontier": asdict(fcfg), "points": points,
              "pareto": {m: pareto([p for p in points if p["method"] == m]) for m in fcfg.methods},
              "stage_seconds": stages.seconds}
    if is_main():  # under torchrun every rank trained its share of each student; one writes the result
        write_json(out / "frontier.json", result)
    return result


def pareto(points: list[dict]) -> list[dict]:
    """The points that no other point beats on both label bytes (fewer) and mean top-1 (higher)."""
    front, best = [], float("-inf")
    for p in sorted(points, key=lambda p: (p["label_bytes"], -p["test_top1"])):
        if p["test_top1"] > best:
            front.append(p)
            best = p["test_top1"]
    return front


def best_within(points: list[dict], budget: float, pruning_only: bool = False) -> dict | None:
    """The most accurate point whose labels take at most ``budget`` bytes (optionally pruning alone)."""
    fits = [p for p in points if p["label_bytes"] <= budget
            and (not pruning_only or (p["topk"] is None and p["policy"] == "constant"))]
    return max(fits, key=lambda p: p["test_top1"], default=None)


def frontier_table(result: dict) -> str:
    """Per method: the Pareto points (label bytes, reduction, total storage with the images, top-1 mean +- std,
    setting)."""
    from .labels import human_bytes

    lines = []
    for method, front in result["pareto"].items():
        lines.append(f"{method}: Pareto points (seeds {result['frontier']['seeds']})")
        for p in front:
            std = "" if p.get("test_top1_std") is None else f" ± {p['test_top1_std'] * 100:.1f}"
            red = f"{p['reduction']:.0f}x" if p.get("reduction") else "?"
            total = f"total {human_bytes(p['total_bytes'])}" if "total_bytes" in p else ""
            lines.append(f"  {human_bytes(p['label_bytes']):>11} {red:>6} {total:>17}  {p['test_top1'] * 100:5.1f}{std:<6}  "
                         f"r={p['prune_ratio']:g} topk={p['topk'] or 'all'} {p['policy']}")
    return "\n".join(lines)
