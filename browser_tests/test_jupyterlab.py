"""Every notebook in a real JupyterLab, driven by headless Chromium: run to the end on the tiny-imagenet-10 quick
run (mnist5k's where the shared Tiny-ImageNet zips, outside the repository, are missing) with no error output
and no warning, every figure inline and saved under DSUTIL_FIGURES with the preset's
name, and the run explorer answering a change of class.

JupyterLab is started here (a free port, a token, the app exposed to the page) on a copy of the notebooks, so
running them changes no tracked file; screenshots of each notebook go to ``.artifacts/browser/``. `make
browser-test` runs this (it installs Debian's chromium and chromium-driver when they are missing); without a
browser it skips, saying why.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / ".artifacts" / "browser"
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
NOTEBOOK_SECONDS = 600

pytestmark = pytest.mark.timeout(3600)  # the first test includes the quick run (4-10 min here) and JupyterLab's start
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (the test extra has it)")
if not (CHROMIUM and DRIVER):
    pytest.skip("no chromium and chromedriver on PATH (apt-get install chromium chromium-driver)",
                allow_module_level=True)

# the notebook panel's state, read through the JupyterLab app the page exposes
STATE_JS = """
const app = window.jupyterapp; if (!app) return null;
const w = app.shell.currentWidget; if (!w || !w.sessionContext || !w.content) return null;
const kernel = w.sessionContext.session && w.sessionContext.session.kernel;
const cells = w.content.widgets.filter(c => c.model.type === 'code');
return {kernel: kernel ? kernel.status : null, cells: cells.length,
        done: cells.filter(c => c.model.executionCount !== null).length,
        errors: cells.flatMap(c => c.model.outputs.toJSON().filter(o => o.output_type === 'error')
                                   .map(o => o.ename + ': ' + o.evalue)),
        warnings: cells.flatMap(c => c.model.outputs.toJSON().filter(o => o.output_type === 'stream' &&
                                     o.name === 'stderr' && /warn/i.test(o.text)).map(o => o.text))};
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """The quick run, a copy of the notebooks and a JupyterLab server over them; yields (url, token, figures, preset)."""
    from dsutil.cli import main
    from dsutil.data import SHARED_TINY

    work = tmp_path_factory.mktemp("lab")
    run = work / "run"
    # the natural-image preset where the shared Tiny-ImageNet zips are (they are outside the repository), else digits
    preset = "tiny-imagenet-10" if list(SHARED_TINY.glob("tiny-imagenet-200-*.zip")) else "mnist5k"
    assert main(["run", preset, "--quick", "--out", str(run)]) == 0
    shutil.copytree(ROOT / "notebooks", work / "notebooks")
    port, token = free_port(), "dsutil-browser-test"
    env = os.environ | {"DSUTIL_PRESET": preset, "DSUTIL_QUICK": "1", "DSUTIL_COMPUTE": "1",
                        "DSUTIL_RUN": str(run), "DSUTIL_FIGURES": str(work / "figures")}
    server = subprocess.Popen([sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}",
                               "--ServerApp.ip=127.0.0.1", f"--IdentityProvider.token={token}",
                               f"--ServerApp.root_dir={work / 'notebooks'}", "--LabApp.expose_app_in_browser=True",
                               "--ServerApp.allow_root=True"], env=env, stdout=subprocess.DEVNULL,
                              stderr=open(work / "jupyter.log", "w"))
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.5)
    else:
        server.kill()
        pytest.fail(f"JupyterLab did not start: {(work / 'jupyter.log').read_text()[-2000:]}")
    yield url, token, work / "figures", preset
    server.terminate()
    server.wait(30)


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1800"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def wait_for(driver, condition, seconds: float, what: str):
    deadline = time.time() + seconds
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"timed out after {seconds:.0f} s waiting for {what}")


NOTEBOOKS = sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_the_notebook_runs_in_jupyterlab(name, lab, browser):
    url, token, figures_dir, preset = lab
    before = {p: p.stat().st_mtime_ns for p in figures_dir.glob("*.png")}
    # a workspace of its own, reset: only this notebook is open, so the app's current widget is this notebook
    browser.get(f"{url}/lab/workspaces/{Path(name).stem}/tree/{name}?reset&token={token}")
    wait_for(browser, lambda: (browser.execute_script(STATE_JS) or {}).get("kernel") == "idle", 180,
             f"{name} to open with an idle kernel")
    browser.execute_script("window.jupyterapp.commands.execute('notebook:run-all-cells')")
    start = time.time()

    def finished():
        s = browser.execute_script(STATE_JS) or {}
        return s if s.get("errors") or (s.get("done") == s.get("cells") and s.get("kernel") == "idle") else None
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        state = wait_for(browser, finished, NOTEBOOK_SECONDS, f"{name} to run to the end")
    finally:  # the page as it was, also when it did not finish
        browser.save_screenshot(str(ARTIFACTS / f"{Path(name).stem}.png"))
        print(name, browser.execute_script(STATE_JS))
    assert not state["errors"], f"{name}: {state['errors']}"
    assert not state["warnings"], f"{name} shows warnings: {state['warnings']}"
    saved = [p.name for p in figures_dir.glob("*.png") if before.get(p) != p.stat().st_mtime_ns]
    assert saved, f"{name} saved no figure into DSUTIL_FIGURES"
    if not name.startswith("04_"):  # the paper's storage figures belong to no preset
        assert all(n.startswith(f"{preset}_") for n in saved), saved
    figures = browser.find_elements("css selector", ".jp-OutputArea-output img")
    assert figures, f"{name} shows no figure inline"
    assert all(browser.execute_script("return arguments[0].naturalWidth", im) > 0 for im in figures)
    print(f"{name}: {state['cells']} cells in {time.time() - start:.0f} s, {len(figures)} images inline")
    if name.startswith("01_"):
        check_the_explorer(browser)


def check_the_explorer(browser):
    """The explorer's class menu: choosing another class redraws its image grid."""
    from selenium.webdriver.support.ui import Select

    selects = browser.find_elements("css selector", ".widget-dropdown select")
    assert len(selects) >= 2, "the explorer's method and class menus are not rendered"
    widget_images = lambda: [im.get_attribute("src") for im in  # noqa: E731
                             browser.find_elements("css selector", ".widget-output img")]
    before = wait_for(browser, widget_images, 60, "the explorer's figure")
    browser.execute_script("arguments[0].scrollIntoView()", selects[1])
    Select(selects[1]).select_by_index(1)
    after = wait_for(browser, lambda: (widget_images() if widget_images() and widget_images() != before else None),
                     120, "the explorer to redraw for another class")
    assert after != before
    browser.save_screenshot(str(ARTIFACTS / "01_quickstart_explorer.png"))
