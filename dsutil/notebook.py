"""The notebooks' setup in one call: the preset and its run, figures shown inline and saved under the run, and
no computation the reader did not ask for (a missing run says what it would cost and how to make it)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .config import ExperimentConfig, load_config
from .files import json_ready, read_json

# how long each job took on the project's 2-core CPU (docs/results.md, docs/beyond-pruning.md), for the message
# a notebook prints instead of starting it unasked (the mnist5k quick run: 102 s with its quick settings of
# 2026-12-01; tiny-imagenet-10's quick time was measured before those settings were cut, and is an upper bound)
MINUTES = {("mnist5k", False): 7, ("mnist5k", True): 1.7, ("tiny-imagenet-10", False): 62,
           ("tiny-imagenet-10", True): 3.2, ("frontier", "mnist5k"): 26, ("frontier", "tiny-imagenet-10"): 46}


class NotComputed(Exception):
    """A result the notebook needs is missing and COMPUTE is off: nothing was started."""

    def _render_traceback_(self):  # IPython shows this in place of a traceback
        return [f"Not computed: {self}"]


@dataclass
class Notebook:
    preset: str
    quick: bool
    compute: bool
    cfg: ExperimentConfig
    run_dir: Path
    figures: Path

    def needs(self, what: str, done: bool, command: str, minutes: float | None) -> None:
        """Stop (with :class:`NotComputed`) unless ``done`` or the reader allowed computing."""
        if not (done or self.compute):
            took = f"about {minutes:g} minutes on 2 CPU cores" if minutes else "a while"
            raise NotComputed(f"{what} is not in {self.run_dir}. Making it takes {took}: run `{command}` in a "
                              "terminal, or set COMPUTE = True in the first cell and run the notebook again.")

    def run(self) -> dict:
        """The run's summary: read when it was made with these settings, else made (only with COMPUTE)."""
        from .runner import ensure_run, finished_summary

        done = finished_summary(self.cfg, self.run_dir) is not None
        self.needs(f"the {self.preset} run" + (" (quick)" if self.quick else ""), done,
                   f"dsutil run {self.preset}{' --quick' if self.quick else ''} --out {self.run_dir}",
                   MINUTES.get((self.preset, self.quick)))
        return ensure_run(self.cfg, self.run_dir)

    def frontier(self) -> dict:
        """``frontier.json`` of the preset's frontier settings: read when made with them, else made (only with
        COMPUTE; it reuses every finished stage)."""
        from dataclasses import asdict

        from .frontier import run_frontier

        path = self.run_dir / "frontier.json"
        done = path.exists() and json_ready(read_json(path).get("frontier")) == json_ready(asdict(self.cfg.frontier))
        self.needs(f"the {self.preset} frontier", done, f"dsutil frontier {self.preset}{' --quick' if self.quick else ''}"
                   f" --out {self.run_dir}", None if self.quick else MINUTES.get(("frontier", self.preset)))
        return read_json(path) if done else run_frontier(self.cfg, self.run_dir)

    def show(self, fig, name: str, prefix: bool = True) -> None:
        """Display ``fig`` inline and save it as ``figures/<experiment>_<name>.png`` (``prefix=False``: ``<name>.png``)."""
        import matplotlib.pyplot as plt
        from IPython.display import display

        from .plots import save_open

        save_open(fig, self.figures / (f"{self.cfg.name}_{name}.png" if prefix else f"{name}.png"))
        display(fig)
        plt.close(fig)


def start(preset: str, quick: bool = False, compute: bool = False) -> Notebook:
    """The notebook's preset (a name, or a YAML or JSON file such as a run's config.json) and folders: the run in
    ``DSUTIL_RUN`` (default: :func:`default_run`), its figures in ``DSUTIL_FIGURES`` (default: the run's
    ``figures/``; the README's ``figures/`` is refreshed by ``make figures`` alone)."""
    from . import plots
    from .runtime import show_log

    plots.theme()
    show_log()  # the stages' messages in the notebook's output
    run_dir = Path(os.environ.get("DSUTIL_RUN") or default_run(preset, quick))
    figures = Path(os.environ.get("DSUTIL_FIGURES") or run_dir / "figures")
    return Notebook(preset, quick, compute, load_config(preset, quick=quick), run_dir, figures)


def default_run(preset: str, quick: bool) -> Path:
    """A run's own config.json is read from its run; another preset file's run is named after the file, a
    packaged preset's after its name, both under ``../runs``."""
    path = Path(preset)
    if path.is_file() and path.name == "config.json":
        return path.parent
    return Path("../runs") / ((path.stem if path.is_file() else preset) + ("-quick" if quick else ""))


def headless(nb, cwd, timeout: int | None = 600):
    """An nbclient runner of the notebook ``nb`` in ``cwd`` (its cells time out after ``timeout`` s), whose
    kernel's replies are polled every second: after a cell that shows ipywidgets, a reply can sit unread behind one
    long wait (jupyter/nbclient#312) and the run hang with its kernel idle. The tests and benchmarks run so."""
    from queue import Empty
    from time import monotonic

    import nbclient
    from jupyter_core.utils import run_sync

    class PollingClient(nbclient.NotebookClient):
        async def async_start_new_kernel_client(self):
            kc = await super().async_start_new_kernel_client()
            wait = kc.shell_channel.get_msg

            async def get_msg(timeout=None):
                end = None if timeout is None else monotonic() + timeout
                while True:
                    try:
                        return await wait(timeout=1.0 if end is None else max(0.0, min(1.0, end - monotonic())))
                    except Empty:
                        if end is not None and monotonic() >= end:
                            raise

            kc.shell_channel.get_msg = get_msg
            return kc

        start_new_kernel_client = run_sync(async_start_new_kernel_client)

    return PollingClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(cwd)}})
