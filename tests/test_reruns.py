"""Reruns and shared folders: the README's stage commands rerun change no byte, two writers of one folder leave
one consistent result, and ``--restart`` removes only what dsutil wrote."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dsutil.cli import main


def stage_commands(run: Path) -> list[list[str]]:
    """The README's stage-by-stage commands (squeeze, recover, relabel, train) at a few-second size."""
    return [["squeeze", "--dataset", "mnist5k", "--num-classes", "3", "--per-class", "30", "--epochs", "1",
             "--out", str(run), "--device", "cpu"],
            ["recover", "--run", str(run), "--method", "lpld", "--ipc", "2", "--iterations", "3", "--no-flip",
             "--device", "cpu"],
            ["relabel", "--run", str(run), "--images", str(run / "recover/lpld-ipc2"), "--epochs", "2",
             "--batch-size", "4", "--no-flip", "--device", "cpu"],
            ["train", "--run", str(run), "--labels", str(run / "labels/lpld-ipc2-e2-b4-none"), "--epochs", "2",
             "--prune-ratio", "0.5", "--device", "cpu"]]


def files_of(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    run = tmp_path_factory.mktemp("reruns") / "run"
    for cmd in stage_commands(run):
        assert main(cmd) == 0, cmd
    return run


def test_the_readme_stage_commands_rerun_are_a_no_op(pipeline):
    before = files_of(pipeline)
    assert any(name.startswith("students/") for name in before)
    for cmd in stage_commands(pipeline):
        assert main(cmd) == 0, cmd
    after = files_of(pipeline)
    assert sorted(after) == sorted(before)
    changed = [name for name in before if after[name] != before[name]]  # bytes or modification time
    assert changed == []


def test_the_label_manifest_holds_no_time(pipeline):
    store = pipeline / "labels/lpld-ipc2-e2-b4-none"
    assert not {"seconds", "loader_wait_seconds"} & set(json.loads((store / "manifest.json").read_text()))
    assert json.loads((store / "timing.json").read_text())["seconds"] > 0


def test_two_trainings_into_one_folder_leave_one_consistent_result(pipeline, tmp_path):
    out = tmp_path / "student"
    base = [sys.executable, "-m", "dsutil", *stage_commands(pipeline)[-1], "--out", str(out)]
    base[base.index("--epochs") + 1] = "30"  # long enough for the two to overlap
    procs = [subprocess.Popen(base + ["--lr", lr], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=os.environ | {"OMP_NUM_THREADS": "1"}) for lr in ("0.001", "0.002")]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert "Traceback" not in loser and ("being written by another dsutil process" in loser
                                         or "holds a student made with other settings" in loser)
    winner_lr = (0.001, 0.002)[[code for code, _ in results].index(0)]
    result = json.loads((out / "train.json").read_text())
    assert result["settings"]["lr"] == winner_lr
    assert sorted(p.name for p in out.iterdir()) == ["dynamics.safetensors", "metrics.jsonl", "stage.json",
                                                     "student.safetensors", "train.json"]
    before = files_of(out)  # the winner's command again: its finished student, untouched
    assert main([*stage_commands(pipeline)[-1], "--out", str(out), "--epochs", "30", "--lr", str(winner_lr)]) == 0
    assert files_of(out) == before


def test_a_held_folder_is_refused_and_a_stale_lock_taken_over(pipeline, tmp_path, capsys):
    import socket

    from dsutil.files import LOCK

    out = tmp_path / "student"
    out.mkdir()
    (out / LOCK).write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))  # a live process
    assert main([*stage_commands(pipeline)[-1], "--out", str(out)]) == 2
    assert f"pid {os.getppid()}" in capsys.readouterr().err
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / LOCK).write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))
    assert main([*stage_commands(pipeline)[-1], "--out", str(out)]) == 0
    assert not (out / LOCK).exists() and (out / "train.json").exists()


def test_a_planted_user_file_survives_restart(pipeline, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(pipeline, run)
    cmds = stage_commands(run)
    planted = [run / "notes.txt", run / "recover/lpld-ipc2/notes.txt", run / "labels/lpld-ipc2-e2-b4-none/notes.txt",
               run / "students" / "mine" / "notes.txt"]
    for path in planted:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("mine")
    student = next(p for p in (run / "students").iterdir() if p.name != "mine")
    (student / "plot.png").write_text("mine")
    planted.append(student / "plot.png")
    assert main([*cmds[3], "--lr", "0.002", "--restart"]) == 0  # another student into the same folder
    assert main([*cmds[2], "--batch-size", "3", "--out", str(run / "labels/lpld-ipc2-e2-b4-none"), "--restart"]) == 0
    assert main([*cmds[0], "--epochs", "2", "--restart"]) == 0  # a new teacher: everything made from the old goes
    assert all(path.read_text() == "mine" for path in planted)
    assert not (run / "recover/lpld-ipc2/images.safetensors").exists()
    assert not list((run / "labels").rglob("*.safetensors")) and not list((run / "students").rglob("train.json"))
