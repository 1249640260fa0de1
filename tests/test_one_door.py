"""`dsutil run` decides through the stages' own markers and locks: a second run into a held folder is refused,
a finished stage is reused only while its outputs are as it wrote them, and overrides mean what they say."""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dsutil.cli import main
from dsutil.config import PRESETS, load_config
from dsutil.files import LOCK, claim
from dsutil.runner import run_experiment
from dsutil.stage import SCHEMA, Identity, Marker, StageMismatch

SMALL = {"data.num_classes": 3, "data.per_class": 30, "teacher.epochs": 1, "methods": ["lpld", "real"],
         "recover.ipc": 2, "recover.iterations": 3, "relabel.epochs": 2, "relabel.batch_size": 4,
         "student.epochs": 2, "student.width": 16, "prune_ratios": [0.0, 0.5], "device": "cpu",
         "frontier.methods": ["lpld"]}
SMALL_FLAGS = [f"{k}={json.dumps(v)}" for k, v in SMALL.items()]


def small_run(out: Path, **more) -> dict:
    return run_experiment(load_config("mnist5k", SMALL | more), out, progress=False)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A whole preset at a few-second size: squeeze, two sets, their stores and four students."""
    out = tmp_path_factory.mktemp("door") / "run"
    small_run(out)
    return out


def copy_of(finished, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


def test_a_rerun_reuses_every_stage_and_each_deleted_output_is_made_again_with_the_same_bytes(finished, tmp_path):
    out = copy_of(finished, tmp_path)
    assert small_run(out)["stages"]["ran"] == []
    student = next((out / "students").glob("lpld-ipc2-random-r0.5*"))
    epoch = sorted((out / "labels/lpld-ipc2").glob("epoch*.safetensors"))[-1]
    for deleted, remade in [(student / "student.safetensors", "student lpld-ipc2-random-r0.5"),
                            (epoch, "relabel lpld-ipc2"), (out / "recover/lpld-ipc2/images.safetensors", "recover lpld"),
                            (out / "teacher.safetensors", "squeeze")]:
        was = deleted.read_bytes()
        deleted.unlink()
        ran = small_run(out)["stages"]["ran"]
        assert any(name.startswith(remade) for name in ran), (deleted, ran)
        assert deleted.read_bytes() == was  # made again, as it was
    assert len(ran) == 1 + 2 + 2 + 4 + 2  # a new teacher: every stage made from it again (hard-label students too)
    log = (out / "logs/rank0.log").read_text()  # each run's header, and what it said
    assert log.count("# settings: ") == 1 + 1 + 4 and "rank 0 of 1" in log
    assert "squeeze: " in log and "whose files are gone: teacher.safetensors; made again" in log, log


def test_a_changed_byte_of_the_teacher_is_refused_by_the_run_and_by_the_stage_commands(finished, tmp_path, capsys):
    out = copy_of(finished, tmp_path)
    teacher = out / "teacher.safetensors"
    data = bytearray(teacher.read_bytes())
    data[-3] ^= 1
    teacher.write_bytes(bytes(data))
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.parent.name != "logs"}
    assert main(["run", "mnist5k", "--out", str(out), *sum((["--set", f] for f in SMALL_FLAGS), [])]) == 2
    err = capsys.readouterr().err
    assert "teacher.safetensors" in err and "changed after it finished" in err, err
    assert main(["squeeze", "--dataset", "mnist5k", "--num-classes", "3", "--per-class", "30", "--epochs", "1",
                 "--width", "64", "--out", str(out), "--device", "cpu"]) == 2  # the preset's teacher, by its command
    assert "teacher.safetensors" in capsys.readouterr().err
    assert before == {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.parent.name != "logs"}
    assert "# stopped: ValueError: " in (out / "logs/rank0.log").read_text().splitlines()[-1]  # but the log says why


def test_a_second_run_into_a_folder_being_written_is_refused_and_the_first_finishes(tmp_path, capsys):
    out = tmp_path / "run"
    flags = sum((["--set", f] for f in SMALL_FLAGS), [])
    first = subprocess.Popen([sys.executable, "-m", "dsutil", "run", "mnist5k", "--out", str(out), *flags,
                              "--set", "student.epochs=30"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):  # the first holds the folder once it has loaded its data
            if (out / LOCK).exists() or first.poll() is not None:
                break
            time.sleep(0.1)
        assert (out / LOCK).exists(), first.communicate()
        assert main(["run", "mnist5k", "--out", str(out), *flags, "--set", "teacher.epochs=2"]) == 2
        assert "is being written by another dsutil process" in capsys.readouterr().err
        # a stage command into a folder inside the held run is refused too
        assert main(["squeeze", "--dataset", "mnist5k", "--epochs", "1", "--out", str(out / "students")]) == 2
        assert "being written by another dsutil process" in capsys.readouterr().err
    finally:
        stdout, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr
    assert json.loads((out / "config.json").read_text())["student"]["epochs"] == 30  # the first's settings
    assert json.loads((out / "squeeze.json").read_text())["settings"]["epochs"] == 1  # the first's teacher
    assert len(json.loads((out / "summary.json").read_text())["stages"]["ran"]) == 1 + 2 + 2 + 4 + 2
    assert not (out / "students" / "squeeze.json").exists() and not (out / LOCK).exists()


def test_an_imported_set_where_a_method_would_recover_is_never_replaced(finished, tmp_path, capsys):
    out = copy_of(finished, tmp_path)
    shutil.rmtree(out / "recover/lpld-ipc2")
    png = finished / "recover/real-ipc2/png"
    assert main(["import", "--run", str(out), "--images", str(png), "--name", "lpld-ipc2", "--device", "cpu"]) == 0
    images = (out / "recover/lpld-ipc2/images.safetensors").read_bytes()
    with pytest.raises(ValueError, match="holds a set imported by `dsutil import`"):
        small_run(out)
    assert (out / "recover/lpld-ipc2/images.safetensors").read_bytes() == images


def test_a_mapping_given_for_a_section_changes_only_its_keys():
    from dsutil.cli import _parse_sets

    cfg = load_config("tiny-imagenet-10", _parse_sets(["relabel={epochs: 2}", "recover={iterations: 5}"]))
    preset = load_config("tiny-imagenet-10")
    assert cfg.relabel.epochs == 2 and cfg.recover.iterations == 5
    assert cfg.relabel.flip is True and cfg.relabel == type(cfg.relabel)(**{**vars(preset.relabel), "epochs": 2})
    assert cfg.recover.r_bn == preset.recover.r_bn and cfg.recover.pixels == preset.recover.pixels
    over = load_config("mnist5k", {"method_overrides": {"lpld": {"r_bn": 0.2}}})
    assert over.recover_config("lpld").r_bn == 0.2


def test_a_student_setting_the_run_sets_per_student_is_refused_not_ignored():
    with pytest.raises(ValueError, match=r"student.prune_ratio=0.9: expected 0: the run trains a student at each"):
        load_config("mnist5k", {"student.prune_ratio": 0.9})
    with pytest.raises(ValueError, match=r"student.seed=3: expected 0 where seeds is set"):
        load_config("tiny-imagenet-10", {"student.seed": 3})
    assert load_config("mnist5k", {"student.seed": 3}).student_seeds() == [3]  # without seeds: honoured


# --- markers and locks -----------------------------------------------------------------------------------------

def marked(tmp_path, schema=SCHEMA, **fields) -> tuple[Marker, Identity]:
    ident = Identity("student", {"lr": 1})
    (tmp_path / "out.txt").write_text("result")
    marker = Marker(tmp_path / "stage.json")
    marker.start(ident)
    marker.finish(1.0, ("out.txt",))
    marker.path.write_text(json.dumps(json.loads(marker.path.read_text()) | {"schema": schema} | fields))
    return marker, ident


def test_a_finished_marker_records_its_outputs_and_a_reuse_checks_them(tmp_path):
    marker, ident = marked(tmp_path)
    assert marker.read()["outputs"]["out.txt"]["bytes"] == 6
    assert marker.claim(ident, ("out.txt",), False, "a result") is True
    (tmp_path / "out.txt").write_text("resulT")  # same size, other content
    with pytest.raises(StageMismatch, match="whose files changed after it finished: out.txt") as e:
        marker.claim(ident, ("out.txt",), False, "a result")
    assert not e.value.redo
    (tmp_path / "out.txt").unlink()
    with pytest.raises(StageMismatch, match="whose files are gone: out.txt") as e:
        marker.claim(ident, ("out.txt",), False, "a result")
    assert e.value.redo


@pytest.mark.parametrize("fields,words", [({"schema": 999}, "schema 999, this dsutil reads 1 to"),
                                          ({"hash": 5}, "is not a dsutil stage marker"),
                                          ({"finished": "yes"}, "is not a dsutil stage marker"),
                                          ({"outputs": {"out.txt": 6}}, "is not a dsutil stage marker"),
                                          ({"inputs": [1]}, "is not a dsutil stage marker")])
def test_a_marker_of_an_unknown_schema_or_shape_is_refused(tmp_path, fields, words):
    marker, ident = marked(tmp_path, **fields)
    with pytest.raises(ValueError, match=words):
        marker.claim(ident, ("out.txt",), False, "a result")


def test_a_marker_removed_while_its_stage_ran_is_one_clear_error(tmp_path):
    marker = Marker(tmp_path / "stage.json")
    marker.start(Identity("student", {}))
    marker.path.unlink()
    with pytest.raises(ValueError, match="was removed while its stage ran"):
        marker.finish(1.0, ())


@pytest.mark.parametrize("content,refused", [("[1, 2]", True), ('"text"', True), ("{\"pid\": \"abc\"}", True),
                                             ("\x00\xff", True), ("{}", True),
                                             (json.dumps({"pid": 10**30, "host": socket.gethostname()}), False),
                                             (json.dumps({"pid": -4, "host": socket.gethostname()}), False)])
def test_a_lock_file_of_any_content_is_a_clean_refusal_or_taken_over(tmp_path, content, refused):
    (tmp_path / LOCK).write_text(content)
    if refused:
        with pytest.raises(ValueError, match="being written by another dsutil process"):
            with claim(tmp_path, "test"):
                pass
    else:  # a pid no process can have: its writer is gone
        with claim(tmp_path, "test"):
            assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()


# --- environment variables -----------------------------------------------------------------------------------

def rank_env(**changes) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("DSUTIL_RENDEZVOUS_SECONDS", "TORCHELASTIC_RUN_ID",
                                                            "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK")}
    return env | {"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)} | changes


LABELS_SIZE = [sys.executable, "-m", "dsutil", "labels", "size", "--classes", "10", "--ipc", "1", "--epochs", "1"]


def test_a_leftover_rank_environment_without_a_launcher_fails_within_10_seconds():
    done = subprocess.run(LABELS_SIZE, env=rank_env(), capture_output=True, text=True, timeout=10)
    assert done.returncode == 2 and "found no peers at 127.0.0.1" in done.stderr, done.stderr
    assert "no launcher's variables are set" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("changes,words", [({"RANK": "abc"}, "RANK='abc': expected this process's rank, 0 to 1"),
                                           ({"RANK": "2"}, "RANK='2': expected this process's rank, 0 to 1"),
                                           ({"MASTER_PORT": "70000"}, "MASTER_PORT='70000': expected a TCP port"),
                                           ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two'"),
                                           ({"DSUTIL_RENDEZVOUS_SECONDS": "0"}, "DSUTIL_RENDEZVOUS_SECONDS='0'")])
def test_rank_variables_are_named_in_their_messages(changes, words):
    done = subprocess.run(LABELS_SIZE, env=rank_env(**changes), capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and words in done.stderr and "Traceback" not in done.stderr, done.stderr


# --- import-teacher, import and a full disk ------------------------------------------------------------------

def teacher_pth(tmp_path, fill=None) -> Path:
    from dsutil.models import build_model

    state = build_model("resnet18", num_classes=3, in_channels=1, image_size=28, width=64, depth=3).state_dict()
    if fill is not None:
        state = {k: v.fill_(fill) if v.is_floating_point() else v for k, v in state.items()}
    path = tmp_path / "teacher.pth"
    import torch

    torch.save(state, path)
    return path


@pytest.mark.parametrize("flags,words", [(["--image-size", "0"], "image_size=0: expected a positive"),
                                         (["--image-size", "-5"], "image_size=-5: expected a positive"),
                                         (["--num-classes", "-3"], "num_classes=-3: expected a positive"),
                                         (["--in-channels", "0"], "in_channels=0: expected a positive")])
def test_import_teacher_refuses_sizes_and_counts_that_make_no_network(tmp_path, capsys, flags, words):
    args = {"--num-classes": "3", "--image-size": "28", "--in-channels": "1"} | dict(zip(flags[::2], flags[1::2]))
    out = tmp_path / "t.safetensors"
    assert main(["import-teacher", "--state-dict", str(teacher_pth(tmp_path)), "--arch", "resnet18",
                 *sum(map(list, args.items()), []), "--out", str(out)]) == 2
    assert words in capsys.readouterr().err and not out.exists()


def test_import_teacher_refuses_nan_weights_a_runs_teacher_and_any_existing_file(finished, tmp_path, capsys):
    def import_to(pth, out):
        return main(["import-teacher", "--state-dict", str(pth), "--arch", "resnet18", "--num-classes", "3",
                     "--image-size", "28", "--in-channels", "1", "--out", str(out)])

    assert import_to(teacher_pth(tmp_path, fill=float("nan")), tmp_path / "nan.safetensors") == 2
    assert "hold NaN or infinite values" in capsys.readouterr().err and not (tmp_path / "nan.safetensors").exists()
    out = copy_of(finished, tmp_path)
    was = (out / "teacher.safetensors").read_bytes()
    assert import_to(teacher_pth(tmp_path), out / "teacher.safetensors") == 2
    err = capsys.readouterr().err
    assert "is the teacher of the run" in err and "--teacher-checkpoint" in err and "recover/lpld-ipc2" in err, err
    assert (out / "teacher.safetensors").read_bytes() == was
    (tmp_path / "mine.safetensors").write_text("my own file")
    assert import_to(teacher_pth(tmp_path), tmp_path / "mine.safetensors") == 2
    assert "exists; import-teacher writes a new file" in capsys.readouterr().err
    assert (tmp_path / "mine.safetensors").read_text() == "my own file"


def test_a_refused_pickle_gives_no_advice_to_load_it_unsafely(tmp_path, capsys):
    import torch

    torch.save({"hook": print}, tmp_path / "code.pth")
    assert main(["import-teacher", "--state-dict", str(tmp_path / "code.pth"), "--arch", "resnet18",
                 "--num-classes", "3", "--image-size", "28", "--out", str(tmp_path / "t.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "dsutil loads only what cannot run code" in err and "weights_only=False" not in err, err


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs folder and a way to resize it (root only): a disk that fills up on cue."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(disk)],
                                           capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs needs root")

    def resize(size: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(disk)], check=True)

    try:
        yield disk, resize
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)


def used(disk: Path) -> int:
    st = os.statvfs(disk)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def one_line_no_space(err: str, where: Path) -> None:
    lines = [line for line in err.splitlines() if "error" in line.lower() or "Traceback" in line]  # not the bar
    assert len(lines) == 1 and "No space left on device" in lines[0] and str(where) in lines[0], err
    assert not list(where.rglob("*.tmp")), list(where.rglob("*.tmp"))  # nothing half-written


def test_relabel_on_a_full_disk_is_one_line_and_resumes_to_the_same_store(finished, tmp_path, small_disk, capsys):
    disk, resize = small_disk
    resize(64 * 1024)
    relabel = ["relabel", "--run", str(finished), "--images", str(finished / "recover/lpld-ipc2"), "--epochs", "40",
               "--batch-size", "4", "--device", "cpu", "--out"]
    assert main([*relabel, str(disk / "labels")]) == 2
    one_line_no_space(capsys.readouterr().err, disk)
    kept = len(list((disk / "labels").glob("epoch*.safetensors")))
    assert 0 < kept < 40
    resize(8 * 1024 * 1024)  # space freed: the rerun goes on from where it stopped
    assert main([*relabel, str(disk / "labels")]) == 0
    assert main([*relabel, str(tmp_path / "ref")]) == 0
    for ref in (tmp_path / "ref").glob("epoch*.safetensors"):
        assert (disk / "labels" / ref.name).read_bytes() == ref.read_bytes()


def test_an_import_stopped_by_a_full_disk_resumes_and_restarts(finished, tmp_path, small_disk, capsys):
    disk, resize = small_disk
    out = disk / "run"
    shutil.copytree(finished, out, ignore=shutil.ignore_patterns("students", "labels"))
    resize(used(disk) + 8 * 1024)
    png = finished / "recover/real-ipc2/png"
    imp = ["import", "--run", str(out), "--images", str(png), "--name", "mine", "--device", "cpu"]
    assert main(imp) == 2
    one_line_no_space(capsys.readouterr().err, out)
    resize(64 * 1024 * 1024)
    assert main(imp) == 0  # it was refused: "holds a set made by recover (unfinished)"
    ref = copy_of(finished, tmp_path)
    assert main(["import", "--run", str(ref), "--images", str(png), "--name", "mine", "--device", "cpu"]) == 0
    for name in ("images.safetensors", "png/0/00000.png"):
        assert (out / "recover/mine" / name).read_bytes() == (ref / "recover/mine" / name).read_bytes()
    assert main([*imp, "--restart"]) == 0  # and made again from the start, on request
    assert (out / "recover/mine/images.safetensors").read_bytes() == (ref / "recover/mine/images.safetensors").read_bytes()


def test_a_notebook_given_a_runs_config_json_reads_that_run(finished, tmp_path, monkeypatch):
    from dsutil.notebook import start

    monkeypatch.delenv("DSUTIL_RUN", raising=False)
    monkeypatch.delenv("DSUTIL_FIGURES", raising=False)
    nb = start(str(finished / "config.json"))
    assert nb.run_dir == finished and nb.figures == finished / "figures"
    assert nb.cfg.student.epochs == SMALL["student.epochs"]  # the run's own settings
    shutil.copy(PRESETS / "mnist5k.yaml", tmp_path / "mine.yaml")
    assert start(str(tmp_path / "mine.yaml"), quick=True).run_dir == Path("../runs/mine-quick")
    assert start("mnist5k").run_dir == Path("../runs/mnist5k")


def test_progress_counts_recover_iterations_and_teacher_steps_with_a_rate(finished, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished, out, ignore=shutil.ignore_patterns("students", "labels", "recover"))
    assert main(["recover", "--run", str(out), "--method", "sre2l", "--ipc", "2", "--iterations", "5",
                 "--batch-images", "2", "--device", "cpu"]) == 0
    err = capsys.readouterr().err  # each pass 5 iterations, counted one by one
    passes = int(re.search(r"recover sre2l \((\d+) passes\)", err).group(1))
    assert passes > 1 and f"{5 * passes}/{5 * passes}" in err and "it/s" in err, err
    assert main(["squeeze", "--dataset", "mnist5k", "--num-classes", "3", "--per-class", "30", "--epochs", "2",
                 "--batch-size", "16", "--out", str(tmp_path / "sq"), "--device", "cpu"]) == 0
    err = capsys.readouterr().err  # 90 images in batches of 16 (the last dropped): 5 steps an epoch
    assert "teacher" in err and "10/10" in err and "step/s" in err, err
    epochs = [json.loads(line) for line in (tmp_path / "sq/teacher_metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == [0, 1] and all(0 < e["epoch_seconds"] <= e["seconds"] for e in epochs)
