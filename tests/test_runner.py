"""The main job: `dsutil demo --quick`, its summary and figures, and the stage cache."""
import json
import os
import shutil
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dsutil.config import load_config
from dsutil.runner import run_experiment, summary_table


@pytest.mark.slow  # the session's quick demo run
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
        assert ratios == [0.0, 0.9, 0.975, 0.99]  # the quick section's
        for st in m["students"]:
            assert 0 <= st["test_top1"] <= 1 and isinstance(st["label_bytes"], int)
            assert st["test_top1_per_seed"] == [st["test_top1"]] and st["test_top1_std"] is None
        bytes_ = [st["label_bytes"] for st in m["students"]]
        assert bytes_[0] == m["label_bytes_full"] and bytes_ == sorted(bytes_, reverse=True)
        assert all(st["test_top1"] > 0.2 for st in m["students"])  # chance is 0.1: even 1% of the labels teaches
    assert s["settings"]["recover"]["ipc"] == 10 and s["seconds"] > 0 and s["seeds"] == [0]
    assert s["environment"] == {k: v for k, v in os.environ.items() if k.startswith("DSUTIL_")}  # as it ran
    assert "±" not in summary_table(s) and "seed 0" in summary_table(s)
    figures = sorted(p.name for p in (quick_demo / "figures").glob("*.png"))
    assert figures == ["accuracy_vs_label_storage.png", "accuracy_vs_pruning.png", "accuracy_vs_total_storage.png",
                       "images_lpld.png",
                       "images_real.png", "images_sre2l.png", "within_class_cosine.png"]
    for name in figures:
        with Image.open(quick_demo / "figures" / name) as im:
            assert im.width > 200 and im.height > 200
            assert len(np.unique(np.asarray(im.convert("L")))) > 10  # not a blank canvas


@pytest.mark.slow
def test_rerun_reuses_every_stage_and_student_epochs_rerun_only_students(quick_demo, tmp_path):
    out = tmp_path / "demo"
    shutil.copytree(quick_demo, out)
    cfg = load_config("mnist5k", quick=True)
    again = run_experiment(cfg, out, progress=False)
    assert again["stages"]["ran"] == []
    assert len(again["stages"]["reused"]) == 1 + 3 * 2 + 3 * 4 + 3  # and a hard-label student per set

    cfg.student.epochs = 5
    changed = run_experiment(cfg, out, progress=False)
    assert all(name.startswith("student") for name in changed["stages"]["ran"])
    assert len(changed["stages"]["ran"]) == 3 * 4 + 3  # the hard-label students too: student.epochs is theirs as well
    assert not any(name.startswith("student") for name in changed["stages"]["reused"])
    from dataclasses import replace

    from dsutil.layout import student_dir

    folder = student_dir(out, "lpld", 10, replace(cfg.student, prune_ratio=0.0))
    assert folder.name.startswith("lpld-ipc10-random-r0-")  # other settings: a folder of their own, the old one kept
    assert json.loads((folder / "train.json").read_text())["epochs"] == 5
    before = student_dir(out, "lpld", 10, replace(cfg.student, prune_ratio=0.0, epochs=None))
    assert folder != before and (before / "train.json").exists()


def test_config_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="preset"):
        load_config("no-such-preset")
    bad = tmp_path / "bad.yaml"
    bad.write_text("recover: {ipcs: 3}\n")
    with pytest.raises(ValueError, match="unknown keys.*ipcs"):
        load_config(bad)


def test_over_seeds_gives_mean_sample_std_and_the_values():
    import statistics

    from dsutil.runner import over_seeds

    gen = np.random.default_rng(0)
    for n in (1, 2, 5):
        runs = [{"test_top1": gen.random(), "test_top5": gen.random(), "test_ece": gen.random(),
                 "label_bytes": int(gen.integers(100, 200))} for _ in range(n)]
        got = over_seeds(runs, list(range(n)))
        for key in ("test_top1", "test_top5", "test_ece"):
            values = [r[key] for r in runs]
            assert got[f"{key}_per_seed"] == values
            assert got[key] == pytest.approx(statistics.fmean(values), rel=1e-12)
            assert got[f"{key}_std"] == (None if n == 1 else pytest.approx(statistics.stdev(values), rel=1e-12))
        assert got["seeds"] == list(range(n))
        assert got["label_bytes"] == round(statistics.fmean(r["label_bytes"] for r in runs))


def test_seeds_must_be_distinct_and_given():
    cfg = load_config("mnist5k")
    assert cfg.student_seeds() == [cfg.student.seed]
    for bad in ([], [1, 1]):
        with pytest.raises(ValueError, match="seeds"):
            load_config("mnist5k", {"seeds": bad})


@pytest.mark.slow
def test_tiny_imagenet_preset_runs_with_seeds(quick_tiny):
    """The natural-image preset at a tiny scale: the demo's summary shape plus per-seed values, mean and std."""
    s = json.loads((quick_tiny / "summary.json").read_text())
    assert s["name"] == "tiny-imagenet-10" and s["dataset"] == "tiny-imagenet" and s["seeds"] == [0, 1]
    assert s["classes"] == sorted(s["classes"]) and len(s["classes"]) == 10 and s["classes"][0] == "n01443537"
    assert s["teacher"]["test_top1"] > 0.2  # 10 classes: chance is 0.1
    assert set(s["methods"]) == {"sre2l", "lpld", "real"}
    for m in s["methods"].values():
        assert 0 < m["within_class_cosine"] < 1
        assert [st["prune_ratio"] for st in m["students"]] == [0.0, 0.99]
        for st in m["students"]:
            values = st["test_top1_per_seed"]
            assert len(values) == 2 and st["test_top1"] == pytest.approx(sum(values) / 2)
            assert st["test_top1_std"] == pytest.approx(abs(values[0] - values[1]) / 2 ** 0.5)
    from dataclasses import replace

    from dsutil.layout import student_dir

    seeded = student_dir(quick_tiny, "lpld", 10, replace(load_config("tiny-imagenet-10", quick=True).student,
                                                         prune_ratio=0.99, seed=1))
    assert json.loads((seeded / "train.json").read_text())["settings"]["seed"] == 1
    assert set(s["stage_seconds_by_kind"]) == {"squeeze", "recover", "relabel", "student"}
    assert all(v > 0 for v in s["stage_seconds_by_kind"].values())
    assert len(s["stage_seconds"]) == 1 + 3 * 2 + 3 * 2 * 2 + 3 * 2  # and a hard-label student per set and seed
    table = summary_table(s)
    assert "mean ± std over seeds [0, 1]" in table and table.count("±") == 3 * 2 + 3 + 1  # and the hard-label column


def test_the_published_presets_keep_the_stage_keys_their_run_folders_hold(tmp_path):
    """Every stage key of mnist5k and tiny-imagenet-10, computed by the stages' own identity functions over
    markers in the format the runner wrote before (no schema), equals the key dsutil recorded before the stages
    kept their own markers (tests/published_stage_keys.json): those run folders reuse every finished stage."""
    from types import SimpleNamespace

    from dsutil.files import write_json
    from dsutil.layout import label_store_dir, recover_dir, student_dir
    from dsutil.recover import recover_identity
    from dsutil.relabel import relabel_identity
    from dsutil.squeeze import squeeze_identity
    from dsutil.stage import Marker
    from dsutil.train import student_identity

    def made_before(marker, key):  # the runner's marker of before: written once the stage had finished
        write_json(marker, {"hash": key, "settings": {}, "upstream": [], "finished": 1.0, "seconds": 1.0})
        assert Marker(marker).finished() and Marker(marker).key() == key

    published = json.loads((Path(__file__).parent / "published_stage_keys.json").read_text())["keys"]
    for preset, keys in published.items():
        cfg, run, got = load_config(preset), tmp_path / preset, {}
        got["squeeze"] = squeeze_identity(SimpleNamespace(settings=cfg.data), cfg.teacher, cfg.teacher_checkpoint).key
        made_before(run / "squeeze.stage.json", keys["squeeze"])
        for m in cfg.methods:
            rcfg = cfg.recover_config(m)
            rdir, store = recover_dir(run, m, rcfg.ipc), label_store_dir(run, m, rcfg.ipc)
            got[f"recover {m}"] = recover_identity(run, rcfg).key
            made_before(rdir / "stage.json", keys[f"recover {m}"])
            got[f"relabel {m}"] = relabel_identity(run, rdir, cfg.relabel).key
            made_before(store / "stage.json", keys[f"relabel {m}"])
            for name in (k for k in keys if k.startswith(f"student {m} ")):
                metric, ratio, seed = name.split()[2:]
                scfg = replace(cfg.student, metric=metric, prune_ratio=float(ratio), seed=int(seed))
                got[name] = student_identity(store, scfg).key
                assert student_dir(run, m, rcfg.ipc, scfg).name  # a folder of its own (tests/test_layout.py)
        assert got == keys, preset
    assert len(published["mnist5k"]) > 10 and len(published["tiny-imagenet-10"]) > 10


def test_a_setting_added_later_changes_a_key_only_when_set_and_only_in_its_own_class():
    from dsutil.config import DataConfig
    from dsutil.recover import RecoverConfig
    from dsutil.relabel import RelabelConfig
    from dsutil.squeeze import TeacherConfig
    from dsutil.stage import Identity, identity_settings
    from dsutil.train import StudentConfig

    for cls in (DataConfig, TeacherConfig, RecoverConfig, RelabelConfig, StudentConfig):
        assert set(cls.ADDED) <= {f.name for f in fields(cls)}, cls  # every entry names a field of its own class
    key = lambda *a: Identity("x", *a).key  # noqa: E731
    assert "pixels" not in identity_settings(RecoverConfig(pixels="float32"))  # the behaviour of before: as before
    assert identity_settings(RecoverConfig())["pixels"] == "uint8"  # today's default is not: such sets are made anew
    assert key(RecoverConfig()) != key(RecoverConfig(pixels="float32"))
    base = StudentConfig()
    assert "hard_epochs" not in identity_settings(base) and key(replace(base, hard_epochs=0.5)) != key(base)
    assert key(base, ("u",)) != key(base, ("v",))
    # an entry of one class does not drop a field of that name in another: relabel's prune_pool is in its key
    assert identity_settings({"a": StudentConfig(), "b": RelabelConfig(prune_pool="first")})["b"]["prune_pool"] == "first"
    assert "topk_fill" not in identity_settings(RelabelConfig()) and "iterations" in identity_settings(RecoverConfig())
    assert identity_settings(RecoverConfig(method="real"))["iterations"] == 0  # real images are never iterated
    assert RecoverConfig(method="real", iterations=300).iterations == 0  # and their recover.json records so
    assert key(RecoverConfig(method="real", iterations=300)) == key(RecoverConfig(method="real"))


def test_run_on_an_image_folder_streams_every_analysis_and_fills_the_summary(tmp_path):
    """An ImageFolder run with the real images' cosine on a seeded sample per class: every number of
    summary.json is there, and the streamed cosine equals every pair of the sample, one at a time."""
    import torch

    from dsutil.analysis import pairwise_cosines
    from dsutil.models import penultimate_features
    from dsutil.recover import load_squeezed
    from dsutil.runner import per_class_sample

    rng = np.random.default_rng(0)
    for split, n in (("train", 24), ("val", 6)):
        for c in range(4):
            for k in range(n):
                path = tmp_path / "data" / split / f"class{c}" / f"{k}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                base = np.zeros((20, 20, 3), np.uint8)
                base[..., c % 3] = 60 * (c + 1)
                Image.fromarray((base + rng.integers(0, 80, base.shape)).astype(np.uint8)).save(path)
    (tmp_path / "p.yaml").write_text(f"""name: folder
data: {{dataset: imagefolder, root: {tmp_path / 'data'}, image_size: 16}}
teacher: {{epochs: 1, width: 8, depth: 2, batch_size: 32}}
methods: [lpld, real]
recover: {{ipc: 2, iterations: 2, batch_images: 8}}
relabel: {{epochs: 2, batch_size: 4}}
student: {{width: 8, depth: 2}}
prune_ratios: [0.0, 0.5]
cosine_per_class: 5
device: cpu
""")
    summary = run_experiment(load_config(tmp_path / "p.yaml"), tmp_path / "run", progress=False)

    def numbers(obj, where=""):
        if isinstance(obj, dict):
            return [n for k, v in obj.items() if k != "settings" for n in numbers(v, f"{where}.{k}")]
        if isinstance(obj, list):
            return [n for i, v in enumerate(obj) for n in numbers(v, f"{where}[{i}]")]
        return [(where, obj)]
    missing = [w for w, v in numbers(summary) if v is None and not w.endswith("_std")  # one seed: no spread
               and w not in (".provenance.commit", ".provenance.dirty", ".provenance.gpu")]  # a copy, no GPU
    assert missing == [] and summary["real_within_class_cosine_images"] == 4 * 5
    teacher, _, _, info = load_squeezed(tmp_path / "run")
    data = load_config(tmp_path / "p.yaml").data.load()
    idx = per_class_sample(data.train.targets, 5, 0)
    assert len(idx) == 20 and idx == per_class_sample(data.train.targets, 5, 0)
    x = torch.stack([data.normalize(data.train[i][0]) for i in idx])
    per_class = pairwise_cosines(penultimate_features(teacher, x), data.train.targets[idx])
    want = float(torch.stack([v.mean() for v in per_class.values()]).mean())
    assert abs(summary["real_within_class_cosine"] - want) < 1e-6
    assert "cosine" in summary_table(summary)


@pytest.mark.slow  # the session's quick demo run
def test_dynamics_pruning_works_when_the_preset_draws_with_replacement(quick_demo, tmp_path):
    """The paper's presets draw student batches with replacement (the official code): a short full-label student
    drawn so would leave whole batches unseen, so the student whose training dynamics score the pruning rules
    cycles through the stored batches, and a batch's score is the mean over its images that were scored (found by
    the notebooks on the full-size rehearsal runs, whose students train 1 epoch)."""
    from dsutil.runner import ensure_student

    out = tmp_path / "demo"
    shutil.copytree(quick_demo, out)
    cfg = load_config("mnist5k", quick=True)
    scfg = replace(cfg.student, epochs=1, draw="replacement", metric="el2n-high", prune_ratio=0.5)
    result = ensure_student(out, "lpld", scfg, 10, device="cpu", progress=False)
    reference = json.loads((Path(result["settings"]["scores_from"]) / "train.json").read_text())
    assert reference["settings"]["draw"] == "cycle" and reference["settings"]["prune_ratio"] == 0.0
    assert result["kept_batches"] == reference["kept_batches"] // 2 and 0 <= result["test_top1"] <= 1
