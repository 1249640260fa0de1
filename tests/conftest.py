"""Shared fixtures: the real MNIST-5k data and one real teacher run, built once per session."""
import pytest
import torch

torch.set_num_threads(max(1, torch.get_num_threads()))


@pytest.fixture(scope="session")
def mnist():
    from dsutil.data import load_dataset

    return load_dataset("mnist5k")


@pytest.fixture(scope="session")
def mnist_run(tmp_path_factory, mnist):
    """A squeezed MNIST-5k run directory: teacher, BN statistics, squeeze.json."""
    from dsutil.squeeze import TeacherConfig, squeeze

    run = tmp_path_factory.mktemp("run")
    squeeze(mnist, run, TeacherConfig(), device="cpu", progress=False)
    return run
