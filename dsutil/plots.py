"""Figures of the finding, in one seaborn theme, with labelled axes and units."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import seaborn as sns  # noqa: E402
import torch  # noqa: E402

METHOD_COLORS = {"sre2l": "#d62728", "lpld": "#1f77b4", "real": "#7f7f7f",
                 "cross-class-classbn": "#ff7f0e", "class-globalbn": "#9467bd"}
METHOD_NAMES = {"sre2l": "SRe2L", "lpld": "LPLD", "real": "real (random)",
                "cross-class-classbn": "cross-class + class BN", "class-globalbn": "class + global BN"}


def theme() -> None:
    sns.set_theme(context="notebook", style="whitegrid", palette="deep")


def save(fig, path) -> Path:
    """Save atomically and close."""
    from .files import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=130, bbox_inches="tight", format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    return path


def cosine_bars(methods: dict[str, float], real: float | None, title: str):
    theme()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    names = list(methods)
    ax.bar([METHOD_NAMES.get(n, n) for n in names], [methods[n] for n in names],
           color=[METHOD_COLORS.get(n, "C0") for n in names])
    if real is not None:
        ax.axhline(real, ls="--", color="k", lw=1, label=f"all real training images ({real:.3f})")
        ax.legend(loc="lower right")
    lo = min([*methods.values(), real or 1]) - 0.1
    ax.set_ylim(max(0, lo), 1)
    ax.set_ylabel("within-class cosine similarity\n(teacher penultimate features)")
    ax.set_title(title)
    return fig


def accuracy_curves(summary: dict, x: str):
    """Student top-1 against the pruning ratio (x='prune_ratio') or the label bytes (x='label_bytes')."""
    theme()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name, m in summary["methods"].items():
        s = [r for r in m["students"] if r.get("metric", "random") == "random"]
        xs = [r[x] / 2**10 if x == "label_bytes" else 1 - r[x] for r in s]
        ax.plot(xs, [r["test_top1"] * 100 for r in s], "o-", color=METHOD_COLORS.get(name), label=METHOD_NAMES.get(name, name))
    ax.set_xscale("log")
    if x == "label_bytes":
        ax.set_xlabel("stored soft labels (KiB, log scale)")
    else:
        ax.set_xlabel("fraction of label batches kept, 1 - r (log scale)")
        ax.invert_xaxis()
    ax.set_ylabel("student test top-1 (%)")
    ax.set_title(f"{summary['dataset']}: accuracy against label {'storage' if x == 'label_bytes' else 'pruning'}")
    ax.legend()
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
    from .recover import load_images, recover_dir

    fig_dir = Path(out) / "figures"
    paths = [save(cosine_bars({n: m["within_class_cosine"] for n, m in summary["methods"].items()},
                              summary["real_within_class_cosine"],
                              f"{summary['dataset']}: how alike are images of one class?"),
                  fig_dir / "within_class_cosine.png"),
             save(accuracy_curves(summary, "prune_ratio"), fig_dir / "accuracy_vs_pruning.png"),
             save(accuracy_curves(summary, "label_bytes"), fig_dir / "accuracy_vs_label_storage.png")]
    for name, m in summary["methods"].items():
        x, y, _ = load_images(recover_dir(out, name, m["ipc"]))
        paths.append(save(image_grid(data.denormalize(x), y, data.classes,
                                     f"{METHOD_NAMES.get(name, name)}, IPC {m['ipc']}"),
                          fig_dir / f"images_{name}.png"))
    return paths
