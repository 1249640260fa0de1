"""SIGKILL relabel and student training at random moments; every rerun completes and the final outputs equal
an uninterrupted run's (benchmarks/crash_loop.py runs the same loop longer)."""
import random
import sys
from pathlib import Path

import pytest

from dsutil.files import read_json
from dsutil.recover import RecoverConfig, recover

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from crash_loop import kill_until_done, relabel_cmd, same_store, same_student, train_cmd  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("crash_loop")]  # one worker builds the module's clean run once
KILL_TIMES = [4.0, 5.0, 6.0]  # seconds after start; the import of torch takes about 3 of them


@pytest.fixture(scope="module")
def clean(copy_squeeze, tmp_path_factory):
    """A run with real images, and an uninterrupted relabel and student made by the same commands."""
    import subprocess

    root = tmp_path_factory.mktemp("crash")
    run = copy_squeeze(root / "run")
    recover(run, RecoverConfig(method="real", ipc=5), device="cpu", progress=False)
    for cmd in (relabel_cmd(run, root / "clean-labels", 150), train_cmd(run, root / "clean-labels", root / "clean-student", 40)):
        subprocess.run(cmd, check=True, capture_output=True)
    return run, root


def test_relabel_killed_again_and_again_ends_with_the_clean_store(clean):
    run, root = clean
    delays = [d + random.Random(0).uniform(-0.5, 0.5) for d in KILL_TIMES]
    killed = kill_until_done(relabel_cmd(run, root / "labels", 150), delays)
    assert killed, "no kill landed while relabel ran: make it longer"
    assert same_store(root / "clean-labels", root / "labels")
    assert read_json(root / "labels" / "stage.json")["finished"] is not None


def test_training_killed_again_and_again_ends_with_the_clean_student(clean):
    run, root = clean
    delays = [d + random.Random(1).uniform(-0.5, 0.5) for d in KILL_TIMES]
    killed = kill_until_done(train_cmd(run, root / "clean-labels", root / "student", 40), delays)
    assert killed, "no kill landed while training ran: make it longer"
    assert same_student(root / "clean-student", root / "student")
    assert len((root / "student" / "metrics.jsonl").read_text().splitlines()) == 40
