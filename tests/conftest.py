"""Shared fixtures: the real MNIST-5k data and one real teacher run, built once per session."""
import os
import shutil

import pytest
import torch

# under pytest -n each worker takes its share of the cores (oversubscribed intra-op threads only wait on each other),
# and so do the dsutil processes its tests start
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    THREADS = max(1, torch.get_num_threads() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    torch.set_num_threads(THREADS)
    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(items):
    """Under ``pytest -n`` (xdist, ``--dist loadgroup``) the tests of one session-wide quick run share a worker,
    so that each quick run is made once, not once per worker."""
    for item in items:
        if "quick_tiny" in item.fixturenames:
            item.add_marker(pytest.mark.xdist_group("quick_tiny"))
        elif "quick_demo" in item.fixturenames:
            item.add_marker(pytest.mark.xdist_group("quick_demo"))


@pytest.fixture(scope="session")
def mnist():
    from dsutil.data import load_dataset

    return load_dataset("mnist5k")


@pytest.fixture(scope="session")
def mnist_run(tmp_path_factory, mnist):
    """A squeezed MNIST-5k run directory: teacher, BN statistics, squeeze.json (4 teacher epochs, not the preset's
    8: about 98.5% on the test split, half the time)."""
    from dsutil.squeeze import TeacherConfig, squeeze

    run = tmp_path_factory.mktemp("run")
    squeeze(mnist, run, TeacherConfig(epochs=4), device="cpu", progress=False)
    return run


@pytest.fixture(scope="session")
def copy_squeeze(mnist_run):
    """A function that copies the teacher run's squeeze outputs into a fresh run folder."""
    def copy(dst):
        dst.mkdir(parents=True, exist_ok=True)
        for name in ("squeeze.json", "teacher.safetensors", "bn_stats.safetensors", "squeeze.stage.json"):
            shutil.copy(mnist_run / name, dst / name)
        return dst
    return copy


@pytest.fixture(scope="session")
def tiny_root():
    """The shared Tiny-ImageNet folder with the first 10 classes extracted into the cache (the rest stays in
    its zips); tests skip (saying why) without it."""
    from dsutil.data import SHARED_TINY, tiny_imagenet_root

    if not list(SHARED_TINY.glob("tiny-imagenet-200-*.zip")):
        pytest.skip(f"shared Tiny-ImageNet zips not found at {SHARED_TINY}")
    return tiny_imagenet_root(num_classes=10)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny batches: one intra-op thread is as fast, and does not stall when another process holds a core."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory):
    """`dsutil demo --quick` into a temporary folder, once per session; tests that change it use a copy."""
    from dsutil.cli import main

    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def quick_tiny(tmp_path_factory, tiny_root):
    """`dsutil run tiny-imagenet-10 --quick` (10 classes x 100 images, 2 student seeds) at two of its pruning ratios,
    once per session (the browser test runs the whole quick run, for the notebooks)."""
    from dsutil.cli import main

    out = tmp_path_factory.mktemp("tiny")
    assert main(["run", "tiny-imagenet-10", "--quick", "--out", str(out), "--set", "prune_ratios=[0.0, 0.99]"]) == 0
    return out
