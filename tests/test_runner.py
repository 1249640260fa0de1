"""The main job: `dsutil demo --quick`, its summary and figures, and the stage cache."""
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from dsutil.config import load_config
from dsutil.runner import run_experiment


def test_quick_demo_writes_the_summary_and_figures(quick_demo):
    s = json.loads((quick_demo / "summary.json").read_text())
    assert s["dataset"] == "mnist5k"
    assert isinstance(s["teacher"]["arch"], str) and 0.9 < s["teacher"]["test_top1"] <= 1
    assert 0 < s["real_within_class_cosine"] < 1
    assert set(s["methods"]) == {"sre2l", "lpld", "real"}
    for m in s["methods"].values():
        assert m["ipc"] == 10 and 0 < m["within_class_cosine"] < 1
        assert isinstance(m["label_bytes_full"], int) and m["label_bytes_full"] > 0
        ratios = [st["prune_ratio"] for st in m["students"]]
        assert ratios == [0.0, 0.5, 0.9, 0.95, 0.975, 0.99]
        for st in m["students"]:
            assert 0 <= st["test_top1"] <= 1 and isinstance(st["label_bytes"], int)
        bytes_ = [st["label_bytes"] for st in m["students"]]
        assert bytes_[0] == m["label_bytes_full"] and bytes_ == sorted(bytes_, reverse=True)
        assert st["test_top1"] > 0.2  # even 1% of the labels teaches something
    assert s["settings"]["recover"]["ipc"] == 10 and s["seconds"] > 0
    figures = sorted(p.name for p in (quick_demo / "figures").glob("*.png"))
    assert figures == ["accuracy_vs_label_storage.png", "accuracy_vs_pruning.png", "images_lpld.png",
                       "images_real.png", "images_sre2l.png", "within_class_cosine.png"]
    for name in figures:
        with Image.open(quick_demo / "figures" / name) as im:
            assert im.width > 200 and im.height > 200
            assert len(np.unique(np.asarray(im.convert("L")))) > 10  # not a blank canvas


def test_rerun_reuses_every_stage_and_student_epochs_rerun_only_students(quick_demo, tmp_path):
    out = tmp_path / "demo"
    shutil.copytree(quick_demo, out)
    cfg = load_config("mnist5k", quick=True)
    again = run_experiment(cfg, out, progress=False)
    assert again["stages"]["ran"] == []
    assert len(again["stages"]["reused"]) == 1 + 3 * 2 + 3 * 6

    cfg.student.epochs = 5
    changed = run_experiment(cfg, out, progress=False)
    assert all(name.startswith("student") for name in changed["stages"]["ran"])
    assert len(changed["stages"]["ran"]) == 18
    assert not any(name.startswith("student") for name in changed["stages"]["reused"])
    assert json.loads((out / "students" / "lpld-ipc10-random-r0" / "train.json").read_text())["epochs"] == 5


def test_config_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="preset"):
        load_config("no-such-preset")
    bad = tmp_path / "bad.yaml"
    bad.write_text("recover: {ipcs: 3}\n")
    with pytest.raises(ValueError, match="unknown keys.*ipcs"):
        load_config(bad)
