"""A careless or unlucky user, second round: inputs checked where they enter (image decode, sizes, presets,
numbers, the environment), one clean error in every process (DataLoader workers included), nothing silently
wrong. Each case runs the real command or reader on real files."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from dsutil.cli import main
from dsutil.config import load_config
from dsutil.data import DatasetError, decode_image
from dsutil.settings import SettingError
from dsutil.train import StudentConfig


def one_clean_error(capsys, words: str) -> str:
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err, err
    assert err.count(": error: ") == 1 and ("\n" + err).count("\ndsutil ") == 1, err  # on a line of its own
    return err


def image_tree(root, files: dict) -> None:
    for name, array in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(root / name)


def rgb(h=8, w=8, value=120):
    return np.full((h, w, 3), value, dtype=np.uint8)


# --- image decode ----------------------------------------------------------------------------------------

def test_16_bit_pngs_are_scaled_not_clipped(tmp_path):
    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    got = np.asarray(decode_image(tmp_path / "deep.png", "L")).astype(np.int64)
    want = np.round(ramp.astype(np.float64) * 255 / 65535).astype(np.int64)  # the float64 reference
    assert np.abs(got - want).max() == 0
    assert (got == 255).mean() < 0.01  # clipping made 99% of these pixels white
    assert np.asarray(decode_image(tmp_path / "deep.png", "RGB")).shape == (64, 64, 3)


def test_a_decompression_bomb_stops_with_its_file(tmp_path, monkeypatch):
    image_tree(tmp_path, {"big.png": rgb(40, 40)})
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 1,600 pixels are a bomb now
    with pytest.raises(DatasetError, match="cannot read image .*big.png"):
        decode_image(tmp_path / "big.png")


@pytest.mark.parametrize("bad", ["text", "mixed sizes", "bomb"])
def test_a_bad_file_in_squeezes_folder_is_one_clean_error_from_a_worker(bad, tmp_path, capsys, monkeypatch):
    files = {f"{split}/{c}/{k}.png": rgb(value=40 * k) for split in ("train", "val") for c in "ab" for k in range(3)}
    image_tree(tmp_path / "data", files)
    if bad == "text":
        (tmp_path / "data/train/b/2.png").write_text("not a PNG at all")
    elif bad == "mixed sizes":
        image_tree(tmp_path / "data", {"train/b/2.png": rgb(10, 12)})
    else:
        image_tree(tmp_path / "data", {"train/b/2.png": rgb(40, 40)})
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # inherited by the forked workers
    args = ["squeeze", "--dataset", "imagefolder", "--data-root", str(tmp_path / "data"), "--epochs", "1",
            "--batch-size", "4", "--out", str(tmp_path / "run"), "--device", "cpu"]
    assert main(args) == 2
    one_clean_error(capsys, "train/b/2.png")
    assert not (tmp_path / "run" / "squeeze.json").exists()


def test_the_message_of_a_worker_error_is_the_workers_own():
    from torch.utils.data import DataLoader

    from dsutil.cli import user_message

    class Broken(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            raise DatasetError(f"cannot read image /data/{i}.png: bad")

    with pytest.raises(DatasetError) as caught:
        next(iter(DataLoader(Broken(), num_workers=1)))
    assert "Original Traceback" in str(caught.value)
    assert user_message(caught.value) == "cannot read image /data/0.png: bad"


# --- sizes, numbers, settings --------------------------------------------------------------------------------

def test_a_teacher_or_images_of_another_size_are_refused_before_work(copy_squeeze, tmp_path, capsys):
    from dsutil.image_store import write_image_set

    run = copy_squeeze(tmp_path / "run")  # an MNIST teacher: 1 x 28 x 28
    args = ["squeeze", "--dataset", "mnist5k", "--image-size", "32", "--teacher-checkpoint",
            str(run / "teacher.safetensors"), "--out", str(tmp_path / "other"), "--device", "cpu"]
    assert main(args) == 2
    one_clean_error(capsys, "takes 1x28x28 images, the data is 1x32x32")
    images = run / "recover" / "big"
    write_image_set(images / "images.safetensors", torch.arange(10), (1, 32, 32),
                    [torch.zeros(10, 1, 32, 32, dtype=torch.uint8)],
                    {"classes": [str(i) for i in range(10)], "mean": [0.5], "std": [0.5]})
    assert main(["relabel", "--run", str(run), "--images", str(images), "--epochs", "1", "--device", "cpu"]) == 2
    one_clean_error(capsys, "holds 1x32x32 images, the teacher")
    assert not [p for p in (run / "labels").rglob("*") if p.is_file()]  # not even a stage marker


def test_a_student_that_diverges_is_not_saved(copy_squeeze, tmp_path, capsys):
    from dsutil.recover import RecoverConfig, recover, recover_dir
    from dsutil.relabel import RelabelConfig, relabel

    run = copy_squeeze(tmp_path / "run")
    recover(run, RecoverConfig(method="real", ipc=2), device="cpu", progress=False)
    store = relabel(run, recover_dir(run, "real", 2), RelabelConfig(epochs=2, batch_size=10), device="cpu",
                    progress=False)
    out = tmp_path / "student"
    assert main(["train", "--run", str(run), "--labels", str(store), "--lr", "1e30", "--out", str(out),
                 "--device", "cpu"]) == 2
    one_clean_error(capsys, "diverged")
    assert not (out / "student.safetensors").exists() and not (out / "train.json").exists()
    assert main(["train", "--run", str(run), "--labels", str(store), "--lr", "inf", "--out", str(out)]) == 2
    one_clean_error(capsys, "lr=inf")


def test_hard_epochs_round_down_and_a_cosine_schedule_must_go_down():
    assert StudentConfig(hard_epochs=0.75).hard_epoch_count(2) == 1
    assert StudentConfig(hard_epochs=0.5).hard_epoch_count(3) == 1
    assert StudentConfig(hard_epochs=0.3).hard_epoch_count(10) == 3  # 0.3 x 10 is 3.0000000000000004
    assert StudentConfig(hard_epochs=1.0).hard_epoch_count(7) == 7
    with pytest.raises(SettingError, match="temperature_min=5: expected at most temperature"):
        StudentConfig(temperature=4, temperature_min=5, temperature_schedule="cosine")
    StudentConfig(temperature=4, temperature_min=5)  # no schedule, no bound


def test_scores_of_another_image_set_are_refused(tmp_path):
    from dsutil.dynamics import SCORES, load_scores
    from dsutil.files import save_tensors

    path = tmp_path / "dynamics.safetensors"
    save_tensors(path, {k: torch.zeros(6) for k in SCORES}, {"early_epochs": 1, "images_sha256": "a" * 64})
    assert len(load_scores(path, "a" * 64, 6)["el2n"]) == 6
    with pytest.raises(ValueError, match="scores another image set"):
        load_scores(path, "b" * 64, 6)
    save_tensors(path, {k: torch.zeros(6) for k in SCORES}, {"early_epochs": 1})  # written before the sha256
    with pytest.raises(ValueError, match="scores 6 images, the labels' set has 8"):
        load_scores(path, "b" * 64, 8)


@pytest.mark.parametrize("argv,words", [
    (["labels", "size", "--classes", "10", "--ipc", str(10**400), "--epochs", "1"], "ipc="),
    (["labels", "size", "--classes", "10", "--ipc", "1", "--epochs", "1", "--topk", "11"], "topk=11"),
])
def test_labels_size_with_impossible_numbers(argv, words, capsys):
    assert main(argv) == 2
    one_clean_error(capsys, words)


def test_run_with_topk_above_the_class_count_stops_before_the_teacher(tmp_path, capsys):
    assert main(["run", "mnist5k", "--quick", "--out", str(tmp_path / "run"), "--set", "relabel.topk=11"]) == 2
    one_clean_error(capsys, "relabel.topk=11: expected at most the data's 10 classes")
    assert not (tmp_path / "run").exists()


# --- presets ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,words", [
    ("student: {lr: 0.01}\nstudent: {lr: 0.02}\n", "'student' is given twice"),
    ("quick: [1, 2]\n", "quick=[1, 2]"),
    ("teacher: [1]\n", "teacher=[1]"),
    ("a: &a [x, x, x, x]\nb: &b [*a, *a, *a, *a]\n" + "".join(f"c{i}: [*b, *b, *b, *b]\n" for i in range(40)),
     "YAML aliases"),
    ("data: {dataset: mnist5k\n", "is not valid YAML"),
    ("? [a, b]\n: 1\n", "is not valid YAML"),  # an unhashable key
    ("- 1\n- 2\n", "expected a mapping of settings"),
])
def test_a_bad_preset_file_is_one_clean_error(text, words, tmp_path, capsys):
    (tmp_path / "p.yaml").write_text(text)
    assert main(["run", str(tmp_path / "p.yaml"), "--out", str(tmp_path / "run")]) == 2
    one_clean_error(capsys, words)
    assert not (tmp_path / "run").exists()


def test_an_empty_section_means_its_defaults(tmp_path):
    (tmp_path / "p.yaml").write_text("teacher:\nstudent:\n  epochs: 3\n")
    cfg = load_config(tmp_path / "p.yaml")
    from dsutil.squeeze import TeacherConfig

    assert cfg.teacher == TeacherConfig() and cfg.teacher.epochs > 0  # the defaults, not None
    assert cfg.student.epochs == 3


def test_a_preset_name_is_not_a_folder_of_that_name_and_never_empty(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mnist5k").mkdir()  # a run folder named like the preset
    assert load_config("mnist5k").name == "mnist5k"
    with pytest.raises(FileNotFoundError, match="config name is empty"):
        load_config("")


# --- the environment and the file system ----------------------------------------------------------------------

def test_environment_variables_naming_a_file_are_clean_errors(tmp_path, capsys, monkeypatch):
    (tmp_path / "f").write_text("a file")
    argv = ["run", "mnist5k", "--quick", "--out", str(tmp_path / "run")]
    monkeypatch.setenv("DSUTIL_TENSORBOARD", str(tmp_path / "f"))
    assert main(argv) == 2
    one_clean_error(capsys, "DSUTIL_TENSORBOARD=")
    monkeypatch.delenv("DSUTIL_TENSORBOARD")
    monkeypatch.setenv("DSUTIL_CACHE", str(tmp_path / "f"))
    from dsutil.data import cache_dir

    with pytest.raises(DatasetError, match="DSUTIL_CACHE=.* is a file"):
        cache_dir()


@pytest.mark.parametrize("where", ["file", "under a file"])
def test_out_that_is_a_file_or_under_one(where, tmp_path, capsys):
    (tmp_path / "f").write_text("a file")
    out = tmp_path / "f" if where == "file" else tmp_path / "f" / "run"
    assert main(["squeeze", "--dataset", "mnist5k", "--epochs", "1", "--out", str(out), "--device", "cpu"]) == 2
    one_clean_error(capsys, str(tmp_path / "f"))
    assert (tmp_path / "f").read_text() == "a file"


def test_a_manifest_that_is_a_json_list(tmp_path):
    from dsutil.files import read_json

    (tmp_path / "manifest.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="manifest.json holds a JSON list; expected an object"):
        read_json(tmp_path / "manifest.json")


def test_a_rank_environment_without_a_launcher_fails_within_seconds(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = os.environ | {"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                        "DSUTIL_RENDEZVOUS_SECONDS": "2"}
    cmd = [sys.executable, "-m", "dsutil", "labels", "size", "--classes", "10", "--ipc", "1", "--epochs", "1"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "found no peers at 127.0.0.1" in done.stderr and "Traceback" not in done.stderr
    env.pop("MASTER_ADDR")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "MASTER_ADDR" in done.stderr and "Traceback" not in done.stderr


# --- import ---------------------------------------------------------------------------------------------------

def test_import_reads_what_an_image_folder_reads_and_keeps_what_was_built_on(copy_squeeze, tmp_path, capsys):
    from dsutil.image_store import ImageSet
    from dsutil.relabel import RelabelConfig, relabel

    run = copy_squeeze(tmp_path / "run")
    classes = json.loads((run / "squeeze.json").read_text())["dataset"]["classes"]
    files = {f"{c}/{k}.png": np.full((28, 28), 30 * k, dtype=np.uint8) for c in classes for k in range(2)}
    files |= {f"{classes[0]}/nested/deeper.png": np.zeros((28, 28), np.uint8)}
    image_tree(tmp_path / "set", files)
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp_path / "set" / classes[1] / "scan.tif")
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp_path / "set" / classes[2] / "anim.gif")
    assert main(["import", "--run", str(run), "--images", str(tmp_path / "set"), "--name", "mine",
                 "--device", "cpu"]) == 0
    images = ImageSet(run / "recover" / "mine" / "images.safetensors")
    assert len(images) == 2 * len(classes) + 3
    assert torch.bincount(images.labels).tolist()[:3] == [3, 3, 3]  # the nested file, the TIFF, the GIF
    relabel(run, run / "recover" / "mine", RelabelConfig(epochs=1, batch_size=10), device="cpu", progress=False)
    before = (run / "recover" / "mine" / "images.safetensors").read_bytes()
    assert main(["import", "--run", str(run), "--images", str(tmp_path / "set"), "--name", "mine",
                 "--device", "cpu"]) == 2
    one_clean_error(capsys, "label stores were made from it")
    assert (run / "recover" / "mine" / "images.safetensors").read_bytes() == before


def test_an_unexpected_error_keeps_its_traceback(monkeypatch):
    import dsutil.labels

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(dsutil.labels, "storage_bytes", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError, match="Tried to allocate"):  # not a one-line exit 2
        main(["labels", "size", "--classes", "10", "--ipc", "1", "--epochs", "1"])
