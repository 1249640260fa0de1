"""Every notebook runs top to bottom in quick mode on tiny-imagenet-10 (and the ones whose figures differ for
grey digits on mnist5k too), saves its figures, shows no warning, and is committed without outputs.

The session's quick runs (``dsutil demo --quick`` and ``dsutil run tiny-imagenet-10 --quick``, the settings of
``load_config(preset, quick=True)``) are copied once per preset and shared by the notebooks through ``DSUTIL_RUN``;
each notebook then adds only its own small extra work.
"""
import os
import shutil
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

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


@pytest.fixture(scope="module", params=["mnist5k", "tiny-imagenet-10"])
def quick_env(request, tmp_path_factory):
    """A copy of the preset's quick run (notebooks add to it) and the environment the kernels inherit."""
    run = request.getfixturevalue("quick_demo" if request.param == "mnist5k" else "quick_tiny")
    tmp = tmp_path_factory.mktemp("notebooks")
    shutil.copytree(run, tmp / "run")
    env = {"DSUTIL_PRESET": request.param, "DSUTIL_QUICK": "1", "DSUTIL_COMPUTE": "1", "DSUTIL_RUN": str(tmp / "run"),
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


# on mnist5k only the quickstart, whose grids and explorer draw one-channel images with the same plotting code
# as the other notebooks; the rest are the same cells on other numbers, and each takes 20-70 s of the suite
MNIST_NOTEBOOKS = ("01_quickstart",)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
@pytest.mark.slow
def test_notebook_runs_in_quick_mode(path, quick_env):
    if os.environ["DSUTIL_PRESET"] == "mnist5k" and path.stem not in MNIST_NOTEBOOKS:
        pytest.skip("run on tiny-imagenet-10 only (same cells, no one-channel images)")
    nb = nbformat.read(path, as_version=4)
    # first, record which interpreter the kernel is: it must be this environment's
    nb.cells.insert(0, nbformat.v4.new_code_cell("import sys; print(sys.executable)"))
    before = {p: p.stat().st_mtime_ns for p in (quick_env / "figures").glob("*.png")}
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOKS_DIR)}})
    client.execute()  # raises CellExecutionError if a cell fails
    exe = nb.cells[0].outputs[0]["text"].strip()
    assert os.path.abspath(exe) == os.path.abspath(sys.executable), f"kernel ran {exe}, not {sys.executable}"
    saved = {p: p.stat().st_mtime_ns for p in (quick_env / "figures").glob("*.png")}
    assert any(before.get(p) != t for p, t in saved.items()), f"{path.name} saved no PNG into DSUTIL_FIGURES"
    preset = os.environ["DSUTIL_PRESET"]
    if path.stem != "04_label_storage":  # the paper's storage figures belong to no preset
        assert all(p.name.startswith(f"{preset}_") for p, t in saved.items() if before.get(p) != t)
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
