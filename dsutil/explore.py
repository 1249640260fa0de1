"""Interactive views of a finished run for JupyterLab (ipywidgets): they read the run's files and compute only
what they show, one class or one pruning ratio at a time, so they open at once on any size of run."""
from __future__ import annotations

from pathlib import Path

import torch

from .files import read_json

REAL_SHOWN = 100  # real images of the chosen class whose teacher features the neighbours are searched among


class ClassView:
    """What the explorer shows of one method's images of one class: the images, their nearest real images in
    the teacher's feature space, their pairwise cosine matrix and the teacher's confidence in the class."""

    def __init__(self, run_dir, data=None, device: str = "cpu"):
        from .data import load_from_source
        from .squeeze import load_squeezed

        self.run_dir = Path(run_dir)
        self.summary = read_json(self.run_dir / "summary.json")
        self.teacher, _, _, info = load_squeezed(self.run_dir, device)
        self.data = data or load_from_source(info["dataset"]["source"])

    @property
    def sets(self) -> dict[str, Path]:
        """Every distilled set of the run by name: the preset's methods, then each other folder of ``recover/``
        (an imported set, a notebook's ablation) by its folder name."""
        from .layout import recover_dir

        sets = {m: recover_dir(self.run_dir, m, v["ipc"]) for m, v in self.summary["methods"].items()}
        for images in sorted((self.run_dir / "recover").glob("*/images.safetensors")):
            if images.parent not in sets.values():
                sets[images.parent.name] = images.parent
        return sets

    @property
    def methods(self) -> list[str]:
        return list(self.sets)

    @torch.no_grad()
    def compute(self, method: str, c: int, seed: int = 0) -> dict:
        """Images (in [0, 1]), nearest real images, cosine matrix and confidence for class ``c`` of the set
        ``method`` (a name of :attr:`sets`)."""
        from torch.utils.data import DataLoader, Subset

        from .data import train_targets
        from .image_store import ImageSet
        from .models import penultimate_features
        from .runner import per_class_sample

        images = ImageSet(self.sets[method] / "images.safetensors")
        rows = torch.nonzero(images.labels == c).flatten()
        x = images[rows]  # only this class's images are read
        targets = train_targets(self.data.train)
        real_idx = [i for i in per_class_sample(targets, REAL_SHOWN, seed) if targets[i] == c]
        real = torch.cat([xb for xb, _ in DataLoader(Subset(self.data.train, real_idx), batch_size=256)])
        dev = next(self.teacher.parameters()).device
        self.teacher.eval()
        f = torch.nn.functional.normalize(penultimate_features(self.teacher, x.to(dev)).double(), dim=1)
        fr = torch.nn.functional.normalize(
            penultimate_features(self.teacher, self.data.normalize(real.to(dev))).double(), dim=1)
        sim = f @ fr.T
        confidence = self.teacher(x.to(dev)).softmax(1)[:, c].cpu()
        return {"images": self.data.denormalize(x), "nearest": real[sim.argmax(1).cpu()].float() / 255,
                "nearest_cosine": sim.max(1).values.cpu(), "cosine": (f @ f.T).cpu(), "confidence": confidence,
                "real_searched": len(real_idx)}

    def figure(self, method: str, c: int):
        """One figure of :meth:`compute`: images over their nearest real images, the cosine matrix, confidence."""
        import matplotlib.pyplot as plt

        from .plots import METHOD_NAMES, _show, theme

        v = self.compute(method, c)
        n = min(len(v["images"]), 10)
        theme()
        fig = plt.figure(figsize=(max(8, n * 0.9 + 4), 4.2))
        grid = fig.add_gridspec(2, n + 2, width_ratios=[1] * n + [2.2, 2.2])
        for k in range(n):
            _show(fig.add_subplot(grid[0, k]), v["images"][k])
            ax = fig.add_subplot(grid[1, k])
            _show(ax, v["nearest"][k])
            ax.set_xlabel(f"{v['nearest_cosine'][k]:.2f}", fontsize=8)
        fig.axes[0].set_ylabel("distilled", fontsize=8)
        fig.axes[1].set_ylabel(f"nearest of\n{v['real_searched']} real", fontsize=8)
        ax = fig.add_subplot(grid[:, n])
        im = ax.imshow(v["cosine"][:n, :n].numpy(), vmin=0, vmax=1, cmap="viridis")
        ax.set_title("pairwise cosine", fontsize=9)
        ax.set_xlabel("image"), ax.set_ylabel("image")
        fig.colorbar(im, ax=ax, fraction=0.046)
        ax = fig.add_subplot(grid[:, n + 1])
        ax.bar(range(n), v["confidence"][:n].numpy())
        ax.set_ylim(0, 1)
        ax.set_title("teacher's p(class)", fontsize=9)
        ax.set_xlabel("image")
        off = v["cosine"][:n, :n][~torch.eye(n, dtype=torch.bool)]
        fig.suptitle(f"{METHOD_NAMES.get(method, method)}, class {self.data.classes[c]}: mean within-class cosine "
                     f"{off.mean():.3f} (of {n} images)" if n > 1 else "", fontsize=10)
        return fig


def run_explorer(run_dir, data=None, device: str = "cpu"):
    """A method x class explorer of a finished run: pick both; the view redraws only that class."""
    import ipywidgets as w
    import matplotlib.pyplot as plt
    from IPython.display import display

    view = ClassView(run_dir, data, device)
    method = w.Dropdown(options=view.methods, description="method")
    cls = w.Dropdown(options=[(name, i) for i, name in enumerate(view.data.classes)], description="class")
    out = w.Output()

    def draw(*_):
        with out:
            out.clear_output(wait=True)
            fig = view.figure(method.value, cls.value)
            display(fig)
            plt.close(fig)

    method.observe(draw, "value")
    cls.observe(draw, "value")
    draw()
    return w.VBox([w.HBox([method, cls]), out], layout={"border": "1px solid #ddd"})


def pruning_view(summary: dict):
    """A slider over the stored pruning ratios: each method's top-1 (mean ± std over seeds) and label bytes."""
    import ipywidgets as w

    ratios = [s["prune_ratio"] for s in next(iter(summary["methods"].values()))["students"]
              if s.get("metric", "random") == "random"]
    slider = w.SelectionSlider(options=ratios, description="ratio r", continuous_update=False)
    table = w.HTML()

    def draw(*_):
        rows = ["<tr><th>method</th><th>top-1 %</th><th>labels kept (KiB)</th><th>of all labels</th></tr>"]
        for name, m in summary["methods"].items():
            s = next(s for s in m["students"] if s["prune_ratio"] == slider.value and s.get("metric", "random") == "random")
            std = f" ± {s['test_top1_std'] * 100:.1f}" if s.get("test_top1_std") is not None else ""
            rows.append(f"<tr><td>{name}</td><td>{s['test_top1'] * 100:.1f}{std}</td>"
                        f"<td>{s['label_bytes'] / 1024:.0f}</td><td>{1 - slider.value:.1%}</td></tr>")
        table.value = "<table>" + "".join(rows) + "</table>"

    slider.observe(draw, "value")
    draw()
    return w.VBox([slider, table])


def toy_view(k: int = 8, steps: int = 300):
    """Notebook 05's toy with sliders: the BN weight r_bn, the real classes' width and their separation; SRe2L's
    and LPLD's points side by side over the real ones, redrawn on each change."""
    import ipywidgets as w
    import matplotlib.pyplot as plt
    from IPython.display import display

    from . import plots, toy

    r_bn = w.FloatSlider(value=1.0, min=0.0, max=3.0, step=0.25, description="r_bn", continuous_update=False)
    sigma = w.FloatSlider(value=0.5, min=0.1, max=1.5, step=0.1, description="class width", continuous_update=False)
    separation = w.FloatSlider(value=1.0, min=0.25, max=2.0, step=0.25, description="separation",
                               continuous_update=False)
    out, text = w.Output(), w.HTML()

    def draw(*_):
        real_x, real_y, centres = toy.real_points(sigma.value, separation.value)
        sets = {m: toy.synthesise(real_x, real_y, centres, m, k, steps, r_bn.value) for m in ("sre2l", "lpld")}
        spread = {m: toy.within_class_spread(*s) for m, s in sets.items()}
        text.value = (f"within-class spread per axis: real {toy.within_class_spread(real_x, real_y):.3f}, "
                      + ", ".join(f"{plots.METHOD_NAMES[m]} {v:.3f}" for m, v in spread.items()))
        with out:
            out.clear_output(wait=True)
            fig = plots.feature_panels(sets, ["A", "B", "C"], f"Toy: {k} synthetic points per class (real points faint)",
                                       background=(real_x, real_y), axis_labels=("feature 1", "feature 2"))
            display(fig)
            plt.close(fig)

    for s in (r_bn, sigma, separation):
        s.observe(draw, "value")
    draw()
    return w.VBox([w.HBox([r_bn, sigma, separation]), text, out])


def recover_view(teacher, stats, cfg, data, ipc: int, iterations: int, shown: list[int]):
    """Notebook 05's small recover with the real teacher, on demand: r_bn, iterations and seed set by sliders,
    both batch groupings (SRe2L's one image per class, LPLD's class batches) made when the button is pressed
    (each press runs the recover engine: seconds to minutes on a CPU), their within-class cosines and images."""
    from dataclasses import replace

    import ipywidgets as w
    import matplotlib.pyplot as plt
    from IPython.display import display

    from . import analysis, plots
    from .models import penultimate_features
    from .recover import recover_in_memory

    r_bn = w.SelectionSlider(options=[0.0, 0.01, 0.03, 0.1, 0.3, 1.0], value=cfg.recover.r_bn
                             if cfg.recover.r_bn in (0.0, 0.01, 0.03, 0.1, 0.3, 1.0) else 0.1, description="r_bn")
    steps = w.IntSlider(value=iterations, min=1, max=max(iterations, 300), description="iterations")
    seed = w.IntSlider(value=1, min=0, max=9, description="seed")
    button, out, text = w.Button(description="recover both"), w.Output(), w.HTML("press the button to recover")
    device = next(teacher.parameters()).device

    def run(*_):
        sets = {}
        for m in ("sre2l", "lpld"):
            rcfg = replace(cfg.recover_config(m), ipc=ipc, iterations=steps.value, r_bn=r_bn.value, seed=seed.value)
            sets[m] = recover_in_memory(teacher, stats, rcfg, data.num_classes, data.shape, data.pixel_range(), device)
        cos = {m: analysis.within_class_cosine(penultimate_features(teacher, x), y) for m, (x, y) in sets.items()}
        text.value = (f"r_bn {r_bn.value}, {steps.value} iterations, seed {seed.value}: within-class cosine "
                      + ", ".join(f"{plots.METHOD_NAMES[m]} {c:.3f}" for m, c in cos.items()))
        with out:
            out.clear_output(wait=True)
            fig = plots.compare_grid({m: (data.denormalize(x), y) for m, (x, y) in sets.items()}, data.classes, shown,
                                     per_class=min(ipc, 6), title=f"{ipc} per class, r_bn {r_bn.value}, "
                                     f"{steps.value} iterations, seed {seed.value}")
            display(fig)
            plt.close(fig)

    button.on_click(run)
    return w.VBox([w.HBox([r_bn, steps, seed, button]), text, out])
