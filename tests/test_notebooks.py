"""The notebooks are committed without outputs, and the quickstart runs top to bottom through a kernel of this
environment on the MNIST-5k quick run (grey digits), saves its figures under the run and shows no warning.

Every notebook runs on the tiny-imagenet-10 quick run in JupyterLab, in a real browser, with the same checks
(browser_tests/, `make browser-test`, which CI runs after this suite): each notebook is run once per CI, not twice.
"""
import os
import shutil
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
from dsutil.notebook import headless  # noqa: E402

NOTEBOOKS_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))


def test_there_are_notebooks():
    names = [p.name for p in NOTEBOOKS]
    assert names == ["01_quickstart.ipynb", "02_within_class_similarity.ipynb", "03_label_pruning.ipynb",
                     "04_label_storage.ipynb", "05_teaching.ipynb", "06_frontier.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_has_no_outputs(path):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name} is saved with outputs"
    assert nb.cells[1].source.startswith("import os\nPRESET = os.environ.get(\"DSUTIL_PRESET\") or \"mnist5k\"")


@pytest.fixture(scope="module")
def quick_env(quick_demo, tmp_path_factory):
    """A copy of the MNIST-5k quick run (the notebook adds to it) and the environment the kernel inherits."""
    tmp = tmp_path_factory.mktemp("notebooks")
    shutil.copytree(quick_demo, tmp / "run")
    env = {"DSUTIL_PRESET": "mnist5k", "DSUTIL_QUICK": "1", "DSUTIL_COMPUTE": "1", "DSUTIL_RUN": str(tmp / "run"),
           "DSUTIL_FIGURES": str(tmp / "figures")}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield tmp
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_the_kernel_is_this_python():
    """``python3`` resolves to the kernel spec of this environment, so notebooks import this dsutil."""
    from jupyter_client.kernelspec import KernelSpecManager

    spec = KernelSpecManager().get_kernel_spec("python3")
    exe = spec.argv[0]
    # jupyter_client starts a spec whose argv[0] is "python" with sys.executable itself
    assert exe in ("python", "python3") or os.path.abspath(exe) == os.path.abspath(sys.executable)


@pytest.mark.slow
def test_the_quickstart_runs_on_grey_digits(quick_env):
    """Its grids and explorer draw one-channel images with the plotting code the other notebooks use."""
    path = NOTEBOOKS_DIR / "01_quickstart.ipynb"
    nb = nbformat.read(path, as_version=4)
    # first, record which interpreter the kernel is: it must be this environment's
    nb.cells.insert(0, nbformat.v4.new_code_cell("import sys; print(sys.executable)"))
    before = {p: p.stat().st_mtime_ns for p in (quick_env / "figures").glob("*.png")}
    headless(nb, NOTEBOOKS_DIR).execute()  # raises CellExecutionError if a cell fails
    exe = nb.cells[0].outputs[0]["text"].strip()
    assert os.path.abspath(exe) == os.path.abspath(sys.executable), f"kernel ran {exe}, not {sys.executable}"
    saved = {p: p.stat().st_mtime_ns for p in (quick_env / "figures").glob("*.png")}
    assert any(before.get(p) != t for p, t in saved.items()), f"{path.name} saved no PNG into DSUTIL_FIGURES"
    assert all(p.name.startswith("mnist5k_") for p, t in saved.items() if before.get(p) != t)
    warnings = [o.get("text", "") for cell in nb.cells for o in cell.get("outputs", [])
                if o.get("name") == "stderr" and "warn" in o.get("text", "").lower()]
    assert not warnings, f"{path.name} shows warnings: {warnings}"


def test_a_missing_run_is_not_computed_unasked(tmp_path, monkeypatch):
    """notebook.start(...).run() on an empty folder starts nothing: it says what is missing, the command that makes
    it and how long it took here; with compute it would run (not run here: that is the notebooks' test above)."""
    from dsutil.notebook import NotComputed, start

    monkeypatch.setenv("DSUTIL_RUN", str(tmp_path / "run"))
    monkeypatch.delenv("DSUTIL_FIGURES", raising=False)
    nb = start("tiny-imagenet-10", quick=False, compute=False)
    assert nb.figures == tmp_path / "run" / "figures"  # figures go under the run, not into the tracked figures/
    with pytest.raises(NotComputed, match=r"about 62 minutes.*`dsutil run tiny-imagenet-10 --out ") as e:
        nb.run()
    assert not (tmp_path / "run").exists()  # nothing was made
    assert e.value._render_traceback_() == [f"Not computed: {e.value}"]
    with pytest.raises(NotComputed, match=r"about 46 minutes.*`dsutil frontier tiny-imagenet-10 --out "):
        nb.frontier()
