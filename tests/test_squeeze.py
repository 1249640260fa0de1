import json

import pytest
import torch
from torch import nn

from dsutil.files import load_model, read_json
from dsutil.models import build_model
from dsutil.squeeze import BNStats, TeacherConfig, bn_statistics, squeeze


def brute_force(model, x, y, num_classes):
    """Per-class and global BN input mean/var by storing every input, two-pass float64."""
    inputs = []
    hooks = [m.register_forward_hook(lambda m, i, o: inputs.append(i[0].double()))
             for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    model.eval()
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    out = []
    for a in inputs:
        flat = lambda t: t.transpose(0, 1).reshape(t.shape[1], -1)  # noqa: E731
        per_class = [(flat(a[y == c]).mean(1), flat(a[y == c]).var(1, unbiased=False)) for c in range(num_classes)]
        out.append((per_class, flat(a).mean(1), flat(a).var(1, unbiased=False)))
    return out


def batches(x, y, sizes):
    i = 0
    for s in sizes:
        yield x[i:i + s], y[i:i + s]
        i += s


def check_against_brute_force(model, x, y, num_classes, sizes):
    stats = bn_statistics(model, batches(x, y, sizes), [str(c) for c in range(num_classes)])
    ref = brute_force(model, x, y, num_classes)
    assert len(stats.layers) == len(ref)
    for i, (per_class, g_mean, g_var) in enumerate(ref):
        for c, (m, v) in enumerate(per_class):
            torch.testing.assert_close(stats.class_mean[i][c], m, rtol=1e-6, atol=1e-9)
            torch.testing.assert_close(stats.class_var[i][c], v, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(stats.global_mean[i], g_mean, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(stats.global_var[i], g_var, rtol=1e-6, atol=1e-9)
    return stats


def test_statistics_equal_brute_force_on_random_inputs():
    torch.manual_seed(0)
    model = build_model("convnet", 4, in_channels=3, image_size=16, width=8, depth=2).double()
    for m in model.modules():  # non-trivial running stats so the BN outputs are not all alike
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2)
    x = torch.randn(70, 3, 16, 16, dtype=torch.float64) * 3 + 1
    y = torch.randint(0, 4, (70,))
    check_against_brute_force(model, x, y, 4, [13, 30, 1, 26])


def test_statistics_equal_brute_force_on_a_real_batch(mnist):
    torch.manual_seed(1)
    model = build_model("resnet18", 10, in_channels=1, image_size=28).double()
    idx = torch.randperm(len(mnist.train), generator=torch.Generator().manual_seed(0))[:60]
    x, y = mnist.normalize(mnist.train.images[idx]).double(), mnist.train.targets[idx]
    assert len(y.unique()) == 10
    stats = check_against_brute_force(model, x, y, 10, [25, 25, 10])
    assert len(stats.layers) == 20  # every BatchNorm2d of a ResNet-18


def test_global_statistics_follow_the_law_of_total_variance(mnist):
    model = build_model("convnet", 10, in_channels=1, image_size=28, width=16).eval()
    idx = torch.randperm(len(mnist.train), generator=torch.Generator().manual_seed(0))[:300]
    x, y = mnist.normalize(mnist.train.images[idx]), mnist.train.targets[idx]
    stats = bn_statistics(model, batches(x, y, [100, 100, 100]), mnist.classes)
    w = stats.class_count / stats.class_count.sum()
    for i in range(len(stats.layers)):
        mean = (w[:, None] * stats.class_mean[i]).sum(0)
        var = (w[:, None] * (stats.class_var[i] + (stats.class_mean[i] - mean) ** 2)).sum(0)
        torch.testing.assert_close(stats.global_mean[i], mean, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(stats.global_var[i], var, rtol=1e-6, atol=1e-9)


def test_statistics_need_a_batchnorm_layer():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    with pytest.raises(ValueError, match="no BatchNorm2d layer"):
        bn_statistics(model, [(torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long))], ["a", "b"])


def test_squeeze_run_saves_a_good_teacher_and_its_statistics(mnist_run, mnist):
    summary = read_json(mnist_run / "squeeze.json")
    assert summary["test_top1"] >= 0.97
    assert summary["dataset"]["classes"] == mnist.classes
    model, spec = load_model(mnist_run / "teacher.safetensors")
    assert spec["arch"] == "convnet"
    stats = BNStats.load(mnist_run / "bn_stats.safetensors")
    assert stats.classes == mnist.classes
    assert stats.class_count.tolist() == [400.0] * 10
    assert [s.shape for s in stats.class_mean] == [(10, 64)] * 3
    assert all(torch.isfinite(v).all() and (v >= 0).all() for v in stats.class_var)


def test_squeeze_onto_a_finished_run_is_refused_or_replaces_everything_made_from_it(copy_squeeze, mnist, tmp_path):
    from dsutil.recover import RecoverConfig, recover

    run = copy_squeeze(tmp_path / "run")
    recover(run, RecoverConfig(method="real", ipc=1), device="cpu", progress=False)
    teacher = (run / "teacher.safetensors").read_bytes()
    cfg = TeacherConfig(width=8, depth=1, epochs=1)
    with pytest.raises(ValueError, match="holds a teacher and what was made from it.*--restart"):
        squeeze(mnist, run, cfg, device="cpu", progress=False)
    assert (run / "teacher.safetensors").read_bytes() == teacher and (run / "recover").exists()
    squeeze(mnist, run, cfg, device="cpu", progress=False, restart=True)
    assert (run / "teacher.safetensors").read_bytes() != teacher
    assert not (run / "recover").exists()  # images of the old teacher are gone with it
    assert sorted(p.name for p in run.iterdir()) == ["bn_stats.safetensors", "squeeze.json", "squeeze.stage.json",
                                                     "teacher.safetensors", "teacher_metrics.jsonl"]
    lines = [json.loads(line) for line in (run / "teacher_metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [0] and 0 <= lines[0]["train_top1"] <= 1 and lines[0]["loss"] > 0


def official_running_rule(model, x, y, num_classes, sizes, momentum=0.1):
    """The official class-aware BN update, one class at a time in float64: mean 0 and variance 1 at the start;
    in every batch, each class present moves towards its images' (biased) statistics in that batch."""
    inputs = []
    hooks = [m.register_forward_hook(lambda m, i, o: inputs.append(i[0].double()))
             for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    model.eval()
    state = None
    with torch.no_grad():
        for xb, yb in batches(x, y, sizes):
            inputs.clear()
            model(xb)
            if state is None:
                state = [[torch.zeros(num_classes, a.shape[1], dtype=torch.float64),
                          torch.ones(num_classes, a.shape[1], dtype=torch.float64)] for a in inputs]
            for (mean, var), a in zip(state, inputs):
                for c in range(num_classes):
                    if (yb == c).any():
                        part = a[yb == c]
                        mean[c] = (1 - momentum) * mean[c] + momentum * part.mean([0, 2, 3])
                        var[c] = (1 - momentum) * var[c] + momentum * part.var([0, 2, 3], unbiased=False)
    for h in hooks:
        h.remove()
    return state


def test_running_estimator_follows_the_official_update_rule():
    torch.manual_seed(1)
    model = build_model("convnet", 5, in_channels=3, image_size=12, width=8, depth=2).double()
    x = torch.randn(90, 3, 12, 12, dtype=torch.float64) * 2 + 0.5
    y = torch.randint(0, 4, (90,))  # class 4 never appears: it keeps the starting mean 0 and variance 1
    sizes = [17, 40, 3, 30]
    stats = bn_statistics(model, batches(x, y, sizes), [str(c) for c in range(5)], estimator="running", momentum=0.1)
    ref = official_running_rule(model, x, y, 5, sizes)
    for i, (mean, var) in enumerate(ref):
        torch.testing.assert_close(stats.class_mean[i], mean, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(stats.class_var[i], var, rtol=1e-9, atol=1e-12)
    assert torch.equal(stats.class_var[0][4], torch.ones_like(stats.class_var[0][4]))
    exact = bn_statistics(model, batches(x, y, sizes), [str(c) for c in range(5)])
    assert not torch.allclose(stats.class_mean[0][:4], exact.class_mean[0][:4], atol=1e-3)  # another estimate


def test_an_official_style_state_dict_becomes_a_teacher_of_a_run(mnist, tmp_path):
    """A torchvision ResNet-18 with the official Tiny-ImageNet stem (3x3 conv, no max-pool), saved by torch.save
    the way torchvision's reference scripts save it (weights under 'model', DDP's 'module.' prefix, the
    arguments as a Namespace), imports with weights_only=True and teaches a run as the same network."""
    import argparse

    import torchvision

    from dsutil.cli import main
    from dsutil.data import load_dataset

    net = torchvision.models.resnet18(num_classes=10)
    net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    net.maxpool = nn.Identity()
    torch.manual_seed(0)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
    pth = tmp_path / "resnet18_tiny.pth"
    torch.save({"model": {f"module.{k}": v for k, v in net.state_dict().items()}, "epoch": 49,
                "args": argparse.Namespace(lr=0.2, model="resnet18")}, pth)
    teacher = tmp_path / "teacher.safetensors"
    assert main(["import-teacher", "--state-dict", str(pth), "--arch", "resnet18", "--num-classes", "10",
                 "--image-size", "32", "--normalize", "imagenet", "--out", str(teacher)]) == 0
    model, spec = load_model(teacher)
    x = torch.randn(4, 3, 32, 32)
    net.eval()
    with torch.no_grad():
        assert torch.equal(model(x), net(x))
    assert spec["arch"] == "resnet18" and isinstance(model.maxpool, nn.Identity)

    with pytest.raises(ValueError, match="normalize"):  # grey digits have no ImageNet normalisation
        load_dataset("mnist5k", normalize="imagenet")
    grey = tmp_path / "grey.pth"  # a teacher that says how it was normalised is refused data normalised otherwise
    net.conv1 = nn.Conv2d(1, 64, 3, 1, 1, bias=False)
    torch.save(net.state_dict(), grey)
    from dsutil.import_set import import_teacher

    import_teacher(grey, tmp_path / "grey.safetensors", "resnet18", 10, 28, in_channels=1, normalize="tiny-imagenet")
    with pytest.raises(ValueError, match="normalised as 'tiny-imagenet'.*data.normalize: tiny-imagenet"):
        squeeze(load_dataset("mnist5k", per_class=2), tmp_path / "run", TeacherConfig(), device="cpu",
                progress=False, teacher_checkpoint=tmp_path / "grey.safetensors")
    assert main(["import-teacher", "--state-dict", str(pth), "--arch", "resnet18", "--num-classes", "200",
                 "--image-size", "32", "--out", str(tmp_path / "bad.safetensors")]) == 2
    torch.save({"model": net.state_dict(), "hook": print}, tmp_path / "code.pth")  # a function is never loaded
    assert main(["import-teacher", "--state-dict", str(tmp_path / "code.pth"), "--arch", "resnet18",
                 "--num-classes", "10", "--image-size", "32", "--out", str(tmp_path / "code.safetensors")]) == 2
    assert not (tmp_path / "code.safetensors").exists()


@pytest.mark.parametrize("estimator", ["exact", "running"])
def test_augmented_views_give_other_targets_the_same_on_every_rerun(mnist, mnist_run, tmp_path, estimator):
    teacher = mnist_run / "teacher.safetensors"
    cfg = TeacherConfig(bn_views="augmented", bn_estimator=estimator)
    for name in ("a", "b"):
        squeeze(mnist, tmp_path / name, cfg, device="cpu", progress=False, teacher_checkpoint=teacher)
    a, b = ((tmp_path / n / "bn_stats.safetensors").read_bytes() for n in ("a", "b"))
    assert a == b  # seeded views (and order): the same bytes
    plain, aug = BNStats.load(mnist_run / "bn_stats.safetensors"), BNStats.load(tmp_path / "a" / "bn_stats.safetensors")
    assert torch.equal(aug.class_count, plain.class_count)
    gap = (aug.class_mean[0] - plain.class_mean[0]).abs().max()
    assert gap > 1e-3  # crops of 8-100% of the area, resized: other statistics than the plain digits
    assert read_json(tmp_path / "a" / "squeeze.json")["settings"]["bn_views"] == "augmented"
