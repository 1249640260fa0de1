"""Settings are typed and range-checked before any work starts, from YAML, --set and the command line."""
import pytest

from dsutil.cli import main
from dsutil.config import load_config
from dsutil.settings import SettingError, convert

BAD_SETTINGS = [  # (--set key=value, the words the error must show)
    ("student.temperature=0", "temperature=0.0"),
    ("student.temperature=-2", "temperature=-2.0"),
    ("student.epochs=0", "epochs=0"),
    ("student.lr=0", "lr=0.0"),
    ("student.optimizer=adam", "optimizer='adam'"),
    ("student.granularity=step", "granularity='step'"),
    ("student.metric=el2n", "metric='el2n'"),
    ("student.prune_ratio=1", "prune ratio"),
    ("student.workers=-1", "workers=-1"),
    ("student.arch=vgg", "arch='vgg'"),
    ("teacher.epochs=0", "teacher.epochs=0"),
    ("teacher.batch_size=0", "batch_size=0"),
    ("teacher.lr=fast", "lr='fast'"),
    ("data.num_classes=0", "num_classes=0"),
    ("data.per_class=-3", "per_class=-3"),
    ("data.dataset=mnist", "dataset='mnist'"),
    ("recover.ipc=0", "ipc=0: expected a positive number"),
    ("recover.ipc=ten", "ipc='ten'"),
    ("recover.iterations=0", "iterations=0: expected a positive"),
    ("recover.crop_scale=[0.5,0.1]", "crop_scale=(0.5, 0.1)"),
    ("recover.crop_scale=[0.5]", "crop_scale=[0.5]"),
    ("recover.r_bn=-1", "r_bn=-1.0"),
    ("recover.jitter=-1", "jitter=-1"),
    ("recover.flip=maybe", "flip='maybe'"),
    ("recover.global_targets=exactly", "global_targets"),
    ("recover.pixels=uint16", "pixels='uint16'"),
    ("relabel.epochs=0", "epochs=0: expected a positive"),
    ("relabel.mix=cutout", "mix='cutout': expected one of none"),
    ("relabel.dtype=int8", "dtype='int8': expected one of fp16"),
    ("relabel.mix_alpha=0", "mix_alpha=0.0"),
    ("relabel.teacher_bf16=maybe", "teacher_bf16='maybe'"),
    ("methods=[lpld,sre3l]", "methods='sre3l'"),
    ("methods=[]", "at least one method"),
    ("prune_ratios=[0,0.99,1.2]", "prune_ratios=1.2"),
    ("prune_metrics=[random,best]", "prune_metrics='best'"),
    ("seeds=[0,0]", "seeds must be"),
    ("seeds=[0,x]", "seeds[1]='x'"),
    ("device=tpu", "device='tpu'"),
    ("method_overrides={lpld: {r_bn: -0.1}}", "recover settings of lpld: r_bn=-0.1"),
    ("method_overrides={lpld: {rbn: 0.1}}", "unknown keys ['rbn']"),
    ("relabel.topk=0", "topk=0"),
    ("relabel.topk_fill=max", "topk_fill='max'"),
    ("student.temperature_schedule=linear", "temperature_schedule='linear'"),
    ("student.temperature_gamma=0", "temperature_gamma=0.0"),
    ("student.temperature_ratio=-1", "temperature_ratio=-1.0"),
    ("student.student_temperature=0", "student_temperature=0.0"),
    ("student.hard_epochs=1.5", "hard_epochs=1.5"),
    ("student.hard_weight=-0.1", "hard_weight=-0.1"),
    ("student.scores_from=runs/x", "scores_from='runs/x'"),
    ("student.pool=last", "pool='last'"),
    ("student.draw=sometimes", "draw='sometimes'"),
    ("student.warmup_epochs=-1", "warmup_epochs=-1"),
    ("student.decay_1d=often", "decay_1d='often'"),
    ("relabel.prune_pool=first-ish", "prune_pool='first-ish'"),
    ("relabel.topk_temperature=0", "topk_temperature=0.0"),
    ("teacher.bn_views=rotated", "bn_views='rotated'"),
    ("teacher.bn_estimator=ema", "bn_estimator='ema'"),
    ("teacher.bn_momentum=1.5", "bn_momentum=1.5"),
    ("teacher.augment=autoaugment", "augment='autoaugment'"),
    ("teacher.lr_warmup_epochs=8", "lr_warmup_epochs=8"),
    ("recover.jitter_range=negative", "jitter_range='negative'"),
    ("recover.image_format=png", "image_format='png'"),
    ("data.normalize=cifar", "normalize='cifar'"),
    ("frontier.methods=[real]", "frontier.methods='real'"),
    ("frontier.topk=[2]", "frontier topk=[2]"),
    ("frontier.policies={constant: {}, hot: {temperature: 0}}", "policy 'hot': temperature=0.0"),
    ("student.lr=.inf", "lr=inf: expected a finite number"),
    ("teacher.lr=.nan", "lr=nan: expected a finite number"),
    ("student.lr.x=1", "student.lr is a value, not a section"),
    ("student.prune_ratio=0.9", "student.prune_ratio=0.9: expected 0: the run trains a student at each of prune_ratios"),
    ("student.metric=entropy-high", "student.metric='entropy-high': expected random: the run trains a student by each of"),
]


@pytest.mark.parametrize("setting,words", BAD_SETTINGS, ids=[s for s, _ in BAD_SETTINGS])
def test_a_bad_setting_stops_dsutil_run_before_any_stage(setting, words, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "mnist5k", "--out", str(out), "--set", setting]) == 2
    err = capsys.readouterr().err
    assert words in err and "mnist5k.yaml" in err, err
    assert not out.exists()  # nothing written, no stage started


def test_values_are_converted_to_their_field_types():
    cfg = load_config("mnist5k", {"student.lr": "1e-3", "recover.ipc": "5", "student.temperature": 2,
                                  "prune_ratios": [0, "0.5"], "recover.crop_scale": [0.25, 1]})
    assert cfg.student.lr == 0.001 and isinstance(cfg.student.lr, float)
    assert cfg.recover.ipc == 5 and isinstance(cfg.recover.ipc, int)
    assert cfg.student.temperature == 2.0 and isinstance(cfg.student.temperature, float)
    assert cfg.prune_ratios == [0.0, 0.5] and all(isinstance(r, float) for r in cfg.prune_ratios)
    assert cfg.recover.crop_scale == (0.25, 1.0)


def test_convert_refuses_what_it_cannot_convert():
    assert convert(None, int | None, "x") is None
    assert convert("7", int | None, "x") == 7
    for value, hint in [(True, int), (1.5, int), ("1.5", int), (True, float), ("x", float), (1, bool),
                        ("yes", bool), (3, str), (3, list[int]), ([1, 2, 3], tuple[float, float]), (None, int)]:
        with pytest.raises(SettingError, match="x="):
            convert(value, hint, "x")


@pytest.mark.parametrize("argv,words", [
    (["labels", "size", "--classes", "10", "--ipc", "-5", "--epochs", "3"], "ipc=-5"),
    (["labels", "size", "--classes", "0", "--ipc", "5", "--epochs", "3"], "classes=0"),
    (["labels", "size", "--classes", "10", "--ipc", "5", "--epochs", "3", "--topk", "11"], "topk=11"),
    (["train", "--run", "r", "--labels", "l", "--temperature", "0"], "temperature=0.0"),
    (["train", "--run", "r", "--labels", "l", "--epochs", "0"], "epochs=0"),
    (["train", "--run", "r", "--labels", "l", "--checkpoint-seconds", "-1"], "checkpoint_seconds=-1.0"),
    (["squeeze", "--out", "r", "--epochs", "0"], "untrained teacher"),
    (["squeeze", "--out", "r", "--num-classes", "0"], "num_classes=0"),
    (["recover", "--run", "r", "--lr", "-1"], "lr=-1.0"),
    (["relabel", "--run", "r", "--images", "i", "--epochs", "0"], "epochs=0"),
])
def test_the_stage_commands_refuse_bad_numbers(argv, words, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert words in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # nothing half-written


@pytest.mark.parametrize("value", ["abc", "-1", "1MiB"])
def test_a_bad_mmap_threshold_is_refused_before_any_work(value, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DSUTIL_MMAP_THRESHOLD", value)
    assert main(["squeeze", "--out", "run", "--epochs", "1"]) == 2
    assert f"DSUTIL_MMAP_THRESHOLD={value!r}: expected a number of bytes" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("text,words", [("recover: {ipc: 3\n", "is not valid YAML"), ("- 1\n- 2\n", "expected a mapping")])
def test_a_broken_yaml_file_names_itself(text, words, tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=f"broken.yaml.*{words}"):
        load_config(path)


def stage_configs():
    from dsutil.config import DataConfig
    from dsutil.recover import RecoverConfig
    from dsutil.relabel import RelabelConfig
    from dsutil.squeeze import TeacherConfig
    from dsutil.train import StudentConfig

    required = {"squeeze": ["--out", "r"], "recover": ["--run", "r"], "relabel": ["--run", "r", "--images", "i"],
                "train": ["--run", "r", "--labels", "l"]}
    return [("squeeze", DataConfig, "data_", {"root": "--data-root", "seed": "--data-seed"}, required["squeeze"]),
            ("squeeze", TeacherConfig, "", {}, required["squeeze"]), ("recover", RecoverConfig, "", {}, required["recover"]),
            ("relabel", RelabelConfig, "", {}, required["relabel"]), ("train", StudentConfig, "", {}, required["train"])]


def other_value(cfg, f, hint):
    """A valid value of field ``f`` other than its default, as (flag words, the value it gives)."""
    import typing

    default, choices = getattr(cfg, f.name), type(cfg).CHOICES.get(f.name)
    if choices:
        value = next(c for c in choices if c != default)
        return [str(value)], value
    if hint is bool:
        return [], not default
    if typing.get_origin(hint) is tuple:
        return ["0.25", "0.5"], (0.25, 0.5)
    value = {"int": 3, "float": 0.5, "str": "x"}.get(getattr(hint, "__name__", ""), 3)
    return [str(value)], value


@pytest.mark.parametrize("command,cls,prefix,renamed,required", stage_configs(), ids=lambda v: getattr(v, "__name__", None))
def test_every_setting_of_a_stage_is_a_flag_made_from_its_dataclass(command, cls, prefix, renamed, required, capsys):
    """Each field is a flag (``--name``, ``--no-name`` for a true default) whose default, choices and help come
    from the dataclass: no flag parses to the default settings, and each flag moves its own field alone."""
    import dataclasses
    import typing

    from dsutil.cli import build_parser
    from dsutil.settings import _optional, from_flags

    parser = build_parser()
    assert from_flags(parser.parse_args([command, *required]), cls, prefix) == cls()
    hints, base = typing.get_type_hints(cls), cls()
    needs = {"eval_resize": (["--dataset", "imagefolder", "--image-size", "2"], {"dataset": "imagefolder", "image_size": 2}),
             "scores_from": (["--metric", "el2n-high"], {"metric": "el2n-high"})}  # fields checked against others
    for f in dataclasses.fields(cls):
        hint = _optional(hints[f.name])[0]
        words, value = other_value(base, f, hint)
        flag = renamed.get(f.name, "--" + ("no-" if hint is bool and getattr(base, f.name) else "") + f.name.replace("_", "-"))
        more, fields_too = needs.get(f.name, ([], {}))
        got = from_flags(parser.parse_args([command, *required, *more, flag, *words]), cls, prefix)
        assert got == dataclasses.replace(base, **fields_too, **{f.name: value}), (flag, words)
    stage = parser._subparsers._group_actions[0].choices[command]
    for a in stage._actions:
        if a.dest.removeprefix(prefix) in cls.CHOICES and a.dest.startswith(prefix):
            assert tuple(a.choices) == tuple(cls.CHOICES[a.dest.removeprefix(prefix)]), a.dest
    with pytest.raises(SystemExit):
        parser.parse_args([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for a in stage._actions:
        if a.option_strings and not a.required and a.dest != "help":
            assert f"(default: {a.default})" in text, a.dest


def test_the_settings_reference_is_made_from_the_dataclasses():
    """docs/settings-reference.md is what ``python -m dsutil.config`` writes: every field of every section, with its
    type and default, so a new setting cannot be left out of it."""
    from dataclasses import fields
    from pathlib import Path

    from dsutil.config import SECTIONS, settings_reference

    doc = (Path(__file__).resolve().parents[1] / "docs" / "settings-reference.md").read_text()
    assert doc == settings_reference(), "docs/settings-reference.md is stale: python -m dsutil.config > it"
    for name, cls in SECTIONS.items():
        for f in fields(cls):
            assert f"| `{name}.{f.name}` |" in doc, (name, f.name)
