"""The run layout (dsutil.layout): one student folder per settings, one label store per top-k fill, and the names of
folders made before the layout moved kept as they were."""
import copy
from dataclasses import fields

import pytest

from dsutil.layout import frontier_student_dir, label_store_dir, student_dir, trained_student_dir
from dsutil.train import StudentConfig


def changed(cfg, name):
    """``cfg`` with one setting moved off its default (unchecked: names are all that is made here)."""
    value = getattr(cfg, name)
    other = {bool: lambda v: not v, int: lambda v: v + 1, float: lambda v: v + 0.5, str: lambda v: v + "x",
             type(None): lambda v: 3}[type(value)](value)
    cfg = copy.copy(cfg)
    object.__setattr__(cfg, name, other)
    return cfg


@pytest.mark.parametrize("folder", [lambda c: student_dir("run", "lpld", 10, c),
                                    lambda c: trained_student_dir("run", "run/labels/lpld-ipc10", c)],
                         ids=["runner", "train command"])
def test_students_of_other_settings_never_share_a_folder(folder):
    base = StudentConfig()
    names = {f.name: folder(changed(base, f.name)) for f in fields(StudentConfig) if f.name != "scores_from"}
    assert folder(base) not in names.values()
    assert len(set(names.values())) == len(names), {k: v.name for k, v in names.items()}


def test_folder_names_of_earlier_runs_are_kept():
    """Names as the published runs hold them (runs/tiny-imagenet-10/students, made before dsutil.layout)."""
    base = StudentConfig()
    assert student_dir("r", "lpld", 10, StudentConfig(prune_ratio=0.975)).name == "lpld-ipc10-random-r0.975"
    assert student_dir("r", "sre2l", 10, StudentConfig(prune_ratio=0.9, pool="first", draw="replacement", seed=2)).name \
        == "sre2l-ipc10-random-r0.9-first-replacement-s2"
    assert student_dir("r", "lpld", 10, StudentConfig(prune_ratio=0.975, warmup_epochs=5)).name \
        == "lpld-ipc10-random-r0.975-49e9db0d"
    assert trained_student_dir("r", "r/labels/x", base).name == "x-convnet-r0-random-batch"
    assert label_store_dir("r", "lpld", 10, 2, "mass") != label_store_dir("r", "lpld", 10, 2, "zero")
    assert frontier_student_dir("r", "lpld", 10, None, 0.975, "step", 1).name == "lpld-ipc10-kall-r0.975-step-s1"
