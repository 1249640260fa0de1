"""Figures of the finding, in one seaborn theme, with labelled axes and units."""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt  # the backend is the caller's: inline in notebooks, Agg in the dsutil command
import seaborn as sns
import torch

METHOD_COLORS = {"sre2l": "#d62728", "lpld": "#1f77b4", "real": "#7f7f7f",
                 "cross-class-classbn": "#ff7f0e", "class-globalbn": "#9467bd"}
METHOD_NAMES = {"sre2l": "SRe2L", "lpld": "LPLD", "real": "real (random)",
                "cross-class-classbn": "cross-class + class BN", "class-globalbn": "class + global BN"}


def theme() -> None:
    sns.set_theme(context="notebook", style="whitegrid", palette="deep")


def save_open(fig, path) -> Path:
    """Save atomically; the figure stays open (a notebook shows it next)."""
    from .files import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=130, bbox_inches="tight", format=path.suffix.lstrip(".") or "png")
    return path


def save(fig, path) -> Path:
    """Save atomically and close."""
    path = save_open(fig, path)
    plt.close(fig)
    return path


def cosine_bars(methods: dict[str, float | None], real: float | None, title: str):
    """One bar per method (a method whose set has one image per class, with no pair to compare, is marked n/a)."""
    theme()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    names = list(methods)
    ax.bar([METHOD_NAMES.get(n, n) for n in names], [methods[n] or 0 for n in names],
           color=[METHOD_COLORS.get(n, "C0") for n in names])
    for i, n in enumerate(names):
        if methods[n] is None:
            ax.text(i, 0.05, "n/a:\none image\nper class", ha="center", va="bottom", transform=ax.get_xaxis_transform())
    methods = {n: v for n, v in methods.items() if v is not None}
    if real is not None:
        ax.axhline(real, ls="--", color="k", lw=1, label=f"all real training images ({real:.3f})")
        ax.legend(loc="lower right")
    lo = min([*methods.values(), real or 1]) - 0.1
    ax.set_ylim(max(0, lo), 1)
    ax.set_ylabel("within-class cosine similarity\n(teacher penultimate features)")
    ax.set_title(title)
    return fig


X_LABELS = {"prune_ratio": "fraction of label batches kept, 1 - r (log scale)",
            "label_bytes": "stored soft labels with their crop recipes (KiB, log scale)",
            "total_bytes": "total storage: images as stored + labels + recipes (KiB, log scale)"}


def accuracy_curves(summary: dict, x: str):
    """Student top-1 against the pruning ratio (x='prune_ratio'), the label bytes (x='label_bytes') or the total
    storage (x='total_bytes'); each method's hard-label student (dashed) and the whole real training set with hard
    labels (dotted, black) beside them, where the run trained them."""
    theme()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    seeds = summary.get("seeds", [0])
    for name, m in summary["methods"].items():
        s = [r for r in m["students"] if r.get("metric", "random") == "random"]
        xs = [r[x] / 2**10 if x.endswith("bytes") else 1 - r[x] for r in s]
        std = [(r.get("test_top1_std") or 0) * 100 for r in s]
        color, label = METHOD_COLORS.get(name), METHOD_NAMES.get(name, name)
        ax.errorbar(xs, [r["test_top1"] * 100 for r in s], yerr=std if len(seeds) > 1 else None, fmt="o-",
                    capsize=3, color=color, label=label)
        if m.get("hard_label"):
            ax.axhline(m["hard_label"]["test_top1"] * 100, ls="--", lw=1, color=color, label=f"{label}, hard labels")
    if summary.get("full_real_hard_label"):
        ax.axhline(summary["full_real_hard_label"]["test_top1"] * 100, ls=":", lw=1.2, color="k",
                   label="all real images, hard labels")
    ax.set_xscale("log")
    ax.set_xlabel(X_LABELS[x])
    if x == "prune_ratio":
        ax.invert_xaxis()
    ax.set_ylabel("student test top-1 (%)" + (f"\nmean ± std over {len(seeds)} seeds" if len(seeds) > 1 else ""))
    what = {"prune_ratio": "label pruning", "label_bytes": "label storage", "total_bytes": "total storage"}[x]
    ax.set_title(f"{summary.get('name', summary['dataset'])}: accuracy against {what}")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return fig


def image_grid(images01: torch.Tensor, labels: torch.Tensor, classes: list[str], title: str, per_class: int = 10,
               max_classes: int = 10):
    """Rows are classes, columns the first images of each class; pixels in [0, 1]."""
    shown = sorted(labels.unique().tolist())[:max_classes]
    cols = min(per_class, max(int((labels == c).sum()) for c in shown))
    fig, axes = plt.subplots(len(shown), cols, figsize=(cols * 0.8, len(shown) * 0.8 + 0.4), squeeze=False)
    for r, c in enumerate(shown):
        imgs = images01[labels == c][:cols]
        for k in range(cols):
            ax = axes[r][k]
            ax.axis("off")
            if k < len(imgs):
                im = imgs[k].permute(1, 2, 0).numpy()
                ax.imshow(im[..., 0] if im.shape[-1] == 1 else im, cmap="gray" if im.shape[-1] == 1 else None,
                          vmin=0, vmax=1)
        axes[r][0].set_title(classes[c], fontsize=7, loc="left")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def demo_figures(out, summary: dict, data) -> list[Path]:
    """The demo's figures under ``out/figures``."""
    from .image_store import ImageSet
    from .layout import recover_dir

    fig_dir = Path(out) / "figures"
    paths = [save(cosine_bars({n: m["within_class_cosine"] for n, m in summary["methods"].items()},
                              summary["real_within_class_cosine"],
                              f"{summary.get('name', summary['dataset'])}: how alike are images of one class?"),
                  fig_dir / "within_class_cosine.png"),
             save(accuracy_curves(summary, "prune_ratio"), fig_dir / "accuracy_vs_pruning.png"),
             save(accuracy_curves(summary, "label_bytes"), fig_dir / "accuracy_vs_label_storage.png"),
             save(accuracy_curves(summary, "total_bytes"), fig_dir / "accuracy_vs_total_storage.png")]
    for name, m in summary["methods"].items():
        images = ImageSet(recover_dir(out, name, m["ipc"]) / "images.safetensors")
        paths.append(save(image_grid(*grid_images(images, data), data.classes,
                                     f"{METHOD_NAMES.get(name, name)}, IPC {m['ipc']}"),
                          fig_dir / f"images_{name}.png"))
    return paths


def grid_rows(labels: torch.Tensor, per_class: int = 10, shown: list[int] | None = None) -> torch.Tensor:
    """The rows a grid draws: the first ``per_class`` images of each class ``shown`` (None: the first 10)."""
    shown = sorted(labels.unique().tolist())[:10] if shown is None else shown
    return torch.cat([torch.nonzero(labels == c).flatten()[:per_class] for c in shown])


def grid_images(images, data, per_class: int = 10, shown: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixels in [0, 1], labels) of the rows a grid draws from a stored set (an ``ImageSet``): only those
    rows are read, so a grid of a 50,000-image set costs what one of 10 classes does."""
    rows = grid_rows(images.labels, per_class, shown)
    return data.denormalize(images[rows]), images.labels[rows]


def _name(n: str) -> str:
    return METHOD_NAMES.get(n, n)


def _show(ax, img: torch.Tensor) -> None:
    im = img.permute(1, 2, 0).numpy()
    ax.imshow(im[..., 0] if im.shape[-1] == 1 else im, cmap="gray" if im.shape[-1] == 1 else None, vmin=0, vmax=1)
    ax.set_xticks([]), ax.set_yticks([])


def compare_grid(sets: dict[str, tuple[torch.Tensor, torch.Tensor]], classes: list[str], shown: list[int],
                 per_class: int = 5, title: str = ""):
    """Image sets side by side: one block of columns per set ({name: (images in [0, 1], labels)}), one row per class."""
    theme()
    fig = plt.figure(figsize=(len(sets) * per_class * 0.75 + 0.5, len(shown) * 0.8 + 0.8))
    subs = fig.subfigures(1, len(sets), wspace=0.02)
    for i, (sub, (name, (x, y))) in enumerate(zip(subs if len(sets) > 1 else [subs], sets.items())):
        axes = sub.subplots(len(shown), per_class, squeeze=False)
        for r, c in enumerate(shown):
            imgs = x[y == c][:per_class]
            for k in range(per_class):
                ax = axes[r][k]
                ax.axis("off") if k >= len(imgs) else _show(ax, imgs[k])
                if k == 0 and i == 0:  # a row is one class in every block: named once, left of them all
                    ax.set_ylabel(f"class {classes[c]}", fontsize=8)
        sub.suptitle(_name(name), color=METHOD_COLORS.get(name, "k"), fontsize=11)
    if title:
        fig.suptitle(title, y=1.06)
    return fig


def ablation_grid(values: dict[str, float], title: str, label: str = "within-class cosine similarity"):
    """The paper's 2 x 2 ablation: grouping (rows) x BN targets (columns), one value per recover method."""
    from .recover import METHODS

    theme()
    rows, cols = ["cross-class", "class"], ["global", "class"]
    grid = torch.full((2, 2), float("nan"))
    names = {}
    for method, v in values.items():
        g, t = METHODS[method]
        grid[rows.index(g), cols.index(t)] = v
        names[(rows.index(g), cols.index(t))] = _name(method)
    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    sns.heatmap(grid.numpy(), ax=ax, cmap="rocket_r", annot=False, cbar_kws={"label": label},
                xticklabels=["global\nBN statistics", "class-wise\nBN statistics"],
                yticklabels=["one image per class\n(cross-class batch)", "IPC images of one class\n(class batch)"])
    for (r, c), n in names.items():
        ax.text(c + 0.5, r + 0.5, f"{grid[r, c]:.3f}\n{n}", ha="center", va="center", fontsize=9,
                color="white" if grid[r, c] > float(grid.nanmean()) else "black")
    ax.set_xlabel("BN targets")
    ax.set_ylabel("recover batch (grouping)")
    ax.set_title(title)
    return fig


def pairwise_distribution(cosines: dict[str, dict[int, torch.Tensor]], classes: list[str], title: str):
    """Distribution of within-class pairwise cosines: pooled per method (violins) and per class (boxes)."""
    import pandas as pd

    theme()
    rows = [{"method": _name(m), "class": classes[c], "cosine": float(v)}
            for m, per in cosines.items() for c, vals in per.items() for v in vals]
    df = pd.DataFrame(rows)
    palette = {_name(m): METHOD_COLORS.get(m, "C0") for m in cosines}
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4), gridspec_kw={"width_ratios": [1, 2.6]})
    sns.violinplot(df, x="method", y="cosine", hue="method", palette=palette, ax=a, cut=0, inner="quartile",
                   density_norm="width", legend=False)
    a.set_xlabel("")
    a.set_ylabel("cosine similarity of a pair of\nimages of one class (teacher features)")
    a.set_title("all classes pooled")
    a.set_xticks(a.get_xticks(), a.get_xticklabels(), rotation=30, ha="right")
    sns.boxplot(df, x="class", y="cosine", hue="method", palette=palette, ax=b, fliersize=1, linewidth=0.8)
    b.set_xlabel("class")
    b.set_ylabel("pairwise cosine similarity")
    b.set_title("per class")
    b.legend(title="", fontsize=8, ncol=len(cosines), loc="lower left")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def feature_panels(points: dict[str, tuple[torch.Tensor, torch.Tensor]], classes: list[str], title: str,
                   background: tuple[torch.Tensor, torch.Tensor] | None = None, axis_labels=("PC 1", "PC 2")):
    """2-D projections, one panel per method ({name: (N x 2 points, labels)}), coloured by class;
    ``background`` (e.g. real training images in the same projection) is drawn faintly behind."""
    theme()
    n = len(points)
    cols = min(n, 3)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.6 * rows + 0.3), sharex=True, sharey=True,
                             squeeze=False)
    colors = sns.color_palette("tab10", len(classes))
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, (name, (xy, y)) in zip(axes.flat, points.items()):
        if background is not None:
            bxy, by = background
            ax.scatter(bxy[:, 0], bxy[:, 1], s=2, alpha=0.08, c=[colors[int(c)] for c in by], rasterized=True)
        ax.scatter(xy[:, 0], xy[:, 1], s=22, c=[colors[int(c)] for c in y], edgecolors="k", linewidths=0.4)
        ax.set_title(_name(name), color=METHOD_COLORS.get(name, "k"))
        ax.set_xlabel(axis_labels[0])
        ax.xaxis.set_tick_params(labelbottom=True)
    for row in axes:
        row[0].set_ylabel(axis_labels[1])
    handles = [plt.Line2D([], [], marker="o", ls="", color=colors[c], label=classes[c]) for c in range(len(classes))]
    fig.suptitle(title)
    fig.tight_layout()
    fig.legend(handles=handles, title="class", loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    return fig


def per_class_bars(values: dict[str, dict[int, float]], ylabel: str, title: str, ax=None):
    """Mean over classes per method as a bar, with each class's value as a dot."""
    theme()
    fig, ax = (plt.subplots(figsize=(5, 3.6)) if ax is None else (ax.figure, ax))
    names = list(values)
    for i, m in enumerate(names):
        v = torch.tensor(list(values[m].values()), dtype=torch.float64)
        ax.bar(i, float(v.mean()), color=METHOD_COLORS.get(m, f"C{i}"), alpha=0.8)
        ax.scatter(i + torch.linspace(-0.25, 0.25, len(v)), v, s=10, color="k", zorder=3)
    ax.set_xticks(range(len(names)), [_name(n) for n in names], rotation=20, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return fig


def grouped_bars(table: dict[str, dict[str, float]], ylabel: str, title: str, xlabel: str = "", log: bool = False,
                 ylim=None, ax=None, annotate: str | None = None, colors: dict[str, str] | None = None):
    """Bars for ``table[group][series]``: groups along x, one coloured bar per series; ``annotate`` is a
    format string (e.g. ``"{:.1f}"``) to print each value on its bar."""
    theme()
    fig, ax = (plt.subplots(figsize=(max(5, 1.2 * len(table) + 2), 3.8)) if ax is None else (ax.figure, ax))
    groups = list(table)
    series = list(dict.fromkeys(s for g in groups for s in table[g]))
    width = 0.8 / len(series)
    for k, s in enumerate(series):
        xs = [i - 0.4 + width * (k + 0.5) for i, g in enumerate(groups) if s in table[g]]
        vs = [table[g][s] for g in groups if s in table[g]]
        bars = ax.bar(xs, vs, width, label=s, color=(colors or {}).get(s, f"C{k}"))
        if annotate:
            ax.bar_label(bars, [annotate.format(v) for v in vs], fontsize=7, padding=1)
    ax.set_xticks(range(len(groups)), groups)
    if log:
        ax.set_yscale("log")
    if ylim:
        ax.set_ylim(*ylim)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return fig


def line_plot(x, series: dict[str, list[float]], xlabel: str, ylabel: str, title: str, logx: bool = False,
              logy: bool = False, styles: dict[str, str] | None = None, ax=None):
    """One line per series over shared x values."""
    theme()
    fig, ax = (plt.subplots(figsize=(5.8, 4)) if ax is None else (ax.figure, ax))
    for k, (name, ys) in enumerate(series.items()):
        ax.plot(x, ys, (styles or {}).get(name, "o-"), label=name, color=f"C{k}")
    ax.set_xscale("log" if logx else "linear")
    ax.set_yscale("log" if logy else "linear")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return fig


def reliability_diagram(curves: dict[str, dict[str, torch.Tensor]], title: str, ece: dict[str, float] | None = None):
    """Accuracy against confidence per bin (from ``analysis.reliability``) for several models, with the
    share of test images per bin below; the diagonal is perfect calibration."""
    theme()
    fig, (a, b) = plt.subplots(2, 1, figsize=(5.5, 5.6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    a.plot([0, 1], [0, 1], "k--", lw=1, label="perfectly calibrated")
    for k, (name, r) in enumerate(curves.items()):
        keep = r["count"] > 0
        mid = (r["edges"][:-1] + r["edges"][1:]) / 2
        label = name if ece is None else f"{name} (ECE {ece[name] * 100:.1f}%)"
        a.plot(r["confidence"][keep], r["accuracy"][keep], "o-", ms=4, color=f"C{k}", label=label)
        b.plot(mid[keep], (r["count"] / r["count"].sum())[keep], "o-", ms=3, color=f"C{k}")
    a.set_ylabel("accuracy in bin")
    a.set_title(title)
    a.legend(fontsize=8)
    b.set_yscale("log")
    b.set_xlabel("confidence (max softmax probability)")
    b.set_ylabel("share of\ntest images")
    b.set_xlim(0, 1.01)
    return fig


def bn_gap_figure(gaps: dict[str, torch.Tensor], layers: list[str], classes: list[str], title: str):
    """``analysis.bn_class_gaps``: class-to-global mean distance per layer and class, and the split of each
    layer's global variance into between-class and within-class parts."""
    theme()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.6), gridspec_kw={"width_ratios": [1.6, 1]})
    sns.heatmap(gaps["mean_gap"].numpy(), ax=a, annot=True, fmt=".2f", cmap="mako_r", annot_kws={"fontsize": 7},
                xticklabels=classes, yticklabels=layers,
                cbar_kws={"label": "|class mean - global mean|\n/ global std (RMS over channels)"})
    a.set_xlabel("class")
    a.set_ylabel("BN layer")
    a.set_title("how far each class's BN means are from the global mean")
    f = gaps["between_fraction"].numpy() * 100
    bars = b.bar(range(len(layers)), f, color="C3")
    b.bar_label(bars, [f"{v:.1f}%" for v in f], fontsize=8, padding=2)
    b.set_xticks(range(len(layers)), layers)
    b.set_ylim(0, max(f) * 1.25)
    b.set_ylabel("between-class share of the\nglobal variance (%)")
    b.set_xlabel("BN layer")
    b.set_title("variance explained by the class means\n(mean over channels; the rest is within-class)", fontsize=10)
    fig.suptitle(title, y=1.06)
    fig.tight_layout()
    return fig


def frontier_plot(result: dict, method: str):
    """Top-1 against label bytes for every frontier setting of one method: pruning alone as a line, the other
    settings as points (marker: policy; filled: top-k), the Pareto frontier as a step line."""
    theme()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    points = [p for p in result["points"] if p["method"] == method]
    markers = dict(zip(result["frontier"]["policies"], "os^vDP*X"))
    curve = sorted((p for p in points if p["topk"] is None and p["policy"] == "constant"), key=lambda p: p["label_bytes"])
    ax.errorbar([p["label_bytes"] / 2**10 for p in curve], [p["test_top1"] * 100 for p in curve],
                yerr=[(p.get("test_top1_std") or 0) * 100 for p in curve], fmt="-", color="#7f7f7f", capsize=3,
                label="pruning alone (all logits, constant T)", zorder=1)
    for p in points:
        ax.scatter(p["label_bytes"] / 2**10, p["test_top1"] * 100, marker=markers[p["policy"]], s=40, zorder=2,
                   facecolors=METHOD_COLORS.get(method) if p["topk"] else "white", edgecolors=METHOD_COLORS.get(method))
    front = result["pareto"][method]
    ax.step([p["label_bytes"] / 2**10 for p in front], [p["test_top1"] * 100 for p in front], where="post",
            color="black", lw=1.2, ls="--", label="Pareto frontier", zorder=3)
    for name, m in markers.items():
        ax.scatter([], [], marker=m, facecolors="white", edgecolors="black", label=f"policy: {name}")
    ax.scatter([], [], marker="o", color=METHOD_COLORS.get(method), label="filled: top-k labels")
    ax.set_xscale("log")
    ax.set_xlabel("stored soft labels incl. replay metadata (KiB, log scale)")
    seeds = result["frontier"]["seeds"]
    ax.set_ylabel("student test top-1 (%)" + (f"\nmean over {len(seeds)} seeds" if len(seeds) > 1 else ""))
    ax.set_title(f"{result['name']}, {METHOD_NAMES.get(method, method)}: label bytes against accuracy")
    ax.legend(fontsize=7, loc="lower right")
    return fig
