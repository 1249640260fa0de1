"""The 2026 protocol beside every result: hard-label students, DD-Ranking's scores and the total storage."""
import json
import math
from pathlib import Path

import pytest
import torch
from test_one_door import SMALL as ONE_SEED  # the suite's one small preset

from dsutil.config import load_config
from dsutil.protocol import add_label_robust_scores, label_robust_scores
from dsutil.runner import run_experiment, summary_table

SMALL = ONE_SEED | {"seeds": [0, 1]}


def test_label_robust_scores_match_values_worked_by_hand():
    # whole real set 60%, the set on hard labels 30%, on soft labels 50%, random real images on soft labels 40%:
    # HLR = 0.60 - 0.30 = 0.30, IOR = 0.50 - 0.40 = 0.10, a = 0.5 * 0.10 - 0.5 * 0.30 = -0.10,
    # LRS = (e^-0.1 - e^-1) / (e - e^-1) = (0.904837 - 0.367879) / (2.718282 - 0.367879) = 0.536958 / 2.350402
    s = label_robust_scores(0.60, 0.30, 0.50, 0.40)
    assert s["hlr"] == pytest.approx(0.30) and s["ior"] == pytest.approx(0.10)
    assert s["lrs"] == pytest.approx(0.228454, abs=1e-6)
    # the ends of the range: images 100 points above the whole real set on hard labels and above random real images
    # on soft ones (a = 1); and the reverse (a = -1)
    assert label_robust_scores(0.0, 1.0, 1.0, 0.0)["lrs"] == pytest.approx(1.0)
    assert label_robust_scores(1.0, 0.0, 0.0, 1.0)["lrs"] == pytest.approx(0.0)
    # w weighs IOR: w = 1 is IOR alone, (e^0.1 - e^-1) / (e - e^-1)
    assert label_robust_scores(0.60, 0.30, 0.50, 0.40, weight=1.0)["lrs"] == \
        pytest.approx((math.exp(0.1) - math.exp(-1)) / (math.e - math.exp(-1)))


def test_scores_of_a_small_table_pair_each_ratio_with_random_real_images_of_the_same_ratio():
    student = lambda r, top1: {"prune_ratio": r, "metric": "random", "test_top1": top1}  # noqa: E731
    methods = {"lpld": {"hard_label": {"test_top1": 0.30}, "students": [student(0.0, 0.50), student(0.9, 0.45)]},
               "real": {"hard_label": {"test_top1": 0.35}, "students": [student(0.0, 0.40), student(0.9, 0.30)]},
               "sre2l": {"hard_label": None, "students": [student(0.0, 0.38)]}}
    add_label_robust_scores(methods, {"test_top1": 0.60})
    lpld = methods["lpld"]["students"]
    assert lpld[0]["scores"]["ior"] == pytest.approx(0.10) and lpld[1]["scores"]["ior"] == pytest.approx(0.15)
    assert lpld[0]["scores"]["hlr"] == lpld[1]["scores"]["hlr"] == pytest.approx(0.30)
    assert lpld[1]["scores"]["lrs"] == pytest.approx((math.exp(-0.075) - math.exp(-1)) / (math.e - math.exp(-1)))
    assert methods["real"]["students"][0]["scores"]["ior"] == 0.0  # random real images against themselves
    assert methods["sre2l"]["students"][0]["scores"] is None  # no hard-label student: no HLR, so no score
    add_label_robust_scores(methods, None)  # no full-real number: nothing scored
    assert all(s["scores"] is None for m in methods.values() for s in m["students"])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("protocol") / "run"
    return out, run_experiment(load_config("mnist5k", SMALL), out, progress=False)


def test_every_image_set_gets_a_hard_label_student_per_seed_that_reads_no_stored_label(run):
    out, summary = run
    for method, m in summary["methods"].items():
        for seed, top1 in zip([0, 1], m["hard_label"]["test_top1_per_seed"]):
            sdir = out / "students" / (f"{method}-ipc2-hard" + (f"-s{seed}" if seed else "") + "-6989ee4b")
            train = json.loads((sdir / "train.json").read_text())
            assert train["test_top1"] == top1 and train["settings"]["seed"] == seed
            assert train["used_batches"] == 0 and train["label_bytes"] == 0 and train["hard_epochs"] == train["epochs"]
            epochs = [json.loads(line) for line in (sdir / "metrics.jsonl").read_text().splitlines()]
            assert [e["labels"] for e in epochs] == ["hard", "hard"]  # one-hot labels in every epoch
            soft = json.loads((out / "students" / sdir.name.replace("-hard", "-random-r0") / "train.json").read_text())
            # the same images, epochs, augmentation, optimiser and seed as the soft-label students
            assert {k: v for k, v in train["settings"].items() if k != "hard_epochs"} == \
                {k: v for k, v in soft["settings"].items() if k != "hard_epochs"}
    ref = summary["full_real_hard_label"]
    assert ref["test_top1"] == summary["teacher"]["test_top1"] and ref["from"] == "teacher"
    assert ref["same_architecture"] is False  # a width-16 student, a width-64 teacher: said, not hidden
    assert "sgd" in ref["recipe"] and "adamw" in ref["recipe"]


def test_the_summary_scores_every_student_and_counts_images_in_the_total_storage(run):
    out, summary = run
    lpld, real = summary["methods"]["lpld"], summary["methods"]["real"]
    assert lpld["image_bytes"] == (out / "recover/lpld-ipc2/images.safetensors").stat().st_size
    for s, r in zip(lpld["students"], real["students"]):
        assert s["total_bytes"] == lpld["image_bytes"] + s["label_bytes"] > s["label_bytes"]
        assert s["scores"] == label_robust_scores(summary["full_real_hard_label"]["test_top1"],
                                                  lpld["hard_label"]["test_top1"], s["test_top1"], r["test_top1"])
    table = summary_table(summary)
    assert "hard" in table.splitlines()[1] and "LRS x100" in table
    assert f"{lpld['students'][1]['scores']['lrs'] * 100:.1f}" in table.splitlines()[-2]
    assert (out / "figures/accuracy_vs_total_storage.png").stat().st_size > 0


def test_a_preset_may_turn_the_baselines_off(tmp_path):
    summary = run_experiment(load_config("mnist5k", SMALL | {"baselines": False, "seeds": [0],
                                                             "methods": ["lpld"]}), tmp_path, progress=False)
    assert summary["methods"]["lpld"]["hard_label"] is None and summary["full_real_hard_label"] is None
    assert not list(Path(tmp_path, "students").glob("*-hard*"))
    assert "LRS" not in summary_table(summary) and "hard" not in summary_table(summary).splitlines()[1]


def test_a_teacher_of_permuted_class_order_stops_the_run_before_recover_and_the_floor_lets_it_go_on(run, tmp_path):
    from dsutil.files import load_tensors, save_tensors

    out, summary = run
    state, meta = load_tensors(out / "teacher.safetensors")
    head = max(k for k in state if k.endswith(".weight") and state[k].ndim == 2)  # the classifier
    order = torch.tensor([1, 2, 0])  # the classes rotated: what a teacher of another class order looks like
    state |= {head: state[head][order], head.replace("weight", "bias"): state[head.replace("weight", "bias")][order]}
    save_tensors(tmp_path / "permuted.safetensors", state, meta)
    cfg = SMALL | {"teacher_checkpoint": str(tmp_path / "permuted.safetensors"), "seeds": [0]}
    with pytest.raises(ValueError, match=r"(?s)under 1.5 x chance \(33.3% for 3 classes\).*another order.*teacher_floor=0"):
        run_experiment(load_config("mnist5k", cfg), tmp_path / "permuted", progress=False)
    assert (tmp_path / "permuted/squeeze.json").exists() and not (tmp_path / "permuted/recover").exists()
    top1 = json.loads((tmp_path / "permuted/squeeze.json").read_text())["test_top1"]
    assert top1 < 0.5 <= summary["teacher"]["test_top1"]  # the same weights, in the run's order, are well above it
    go_on = run_experiment(load_config("mnist5k", cfg | {"teacher_floor": 0}), tmp_path / "permuted", progress=False)
    assert go_on["teacher"]["test_top1"] == top1 and (tmp_path / "permuted/recover/lpld-ipc2/images.safetensors").exists()


def test_every_stage_marker_and_the_summary_say_which_code_software_and_machine_made_them(run):
    import torch as t

    import dsutil

    out, summary = run
    for marker in [out / "squeeze.stage.json", *out.glob("**/stage.json")]:
        p = json.loads(marker.read_text())["provenance"]
        assert p["dsutil"] == dsutil.__version__ and p["torch"] == t.__version__ and p["python"].startswith("3.")
        assert p["cpu"] and isinstance(p["cpu_vector"], list) and p["date"].startswith("20")
        assert (p["commit"] is None) == (not (Path(dsutil.__file__).parent.parent / ".git").exists())
    assert summary["provenance"]["seeds"] == [0, 1] and summary["provenance"]["torch"] == t.__version__


def test_labels_size_adds_the_images_to_the_total_as_an_image_store_keeps_them(run, capsys):
    from dsutil.cli import main
    from dsutil.protocol import pixel_bytes

    out, summary = run
    # the run's own set: 3 classes x 2 images of 1 x 28 x 28 float32 pixels, plus its labels and header
    stored = summary["methods"]["lpld"]["image_bytes"]
    assert 0 < stored - pixel_bytes(3, 2, 28, 1, "float32") < 1024
    assert main(["labels", "size", "--classes", "1000", "--ipc", "10", "--epochs", "300", "--image-size", "224",
                 "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["image_bytes"] == 1000 * 10 * 3 * 224 * 224 == pixel_bytes(1000, 10, 224)  # uint8: a byte a value
    assert got["total_bytes"] == got["bytes"] + got["image_bytes"]
    assert main(["labels", "size", "--classes", "10", "--ipc", "10", "--epochs", "1", "--image-size", "32",
                 "--pixels", "float32"]) == 0
    assert "images 1.17 MiB (float32); total 1.18 MiB (1233916 bytes; the labels are 0.4% of it)" in capsys.readouterr().out


def test_the_frontier_counts_each_budget_with_the_images_as_stored(run):
    from dsutil.frontier import frontier_table, run_frontier

    out, summary = run
    cfg = load_config("mnist5k", SMALL | {"frontier.prune_ratios": [0.5], "frontier.curve_ratios": [0.0],
                                          "frontier.seeds": [0]})
    result = run_frontier(cfg, out, progress=False)
    images = summary["methods"]["lpld"]["image_bytes"]
    assert len(result["points"]) == 1 + 2 * 3 and all(p["total_bytes"] == images + p["label_bytes"] for p in result["points"])
    assert "total " in frontier_table(result)
