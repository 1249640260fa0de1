"""The run explorer's numbers (dsutil.explore) against a brute-force float64 loop over the same images."""
import pytest
import torch

from dsutil.data import train_targets
from dsutil.explore import ClassView, pruning_view
from dsutil.image_store import ImageSet
from dsutil.models import penultimate_features
from dsutil.recover import recover_dir
from dsutil.runner import per_class_sample

pytestmark = pytest.mark.slow  # the session's quick demo run


def test_the_class_view_equals_a_loop_over_every_pair(quick_demo):
    view = ClassView(quick_demo)
    c, method = 3, "lpld"
    v = view.compute(method, c)
    images = ImageSet(recover_dir(quick_demo, method, view.summary["methods"][method]["ipc"]) / "images.safetensors")
    x = images[torch.nonzero(images.labels == c).flatten()]
    assert torch.allclose(v["images"], view.data.denormalize(x))
    f = penultimate_features(view.teacher, x).double()
    targets = train_targets(view.data.train)
    idx = [i for i in per_class_sample(targets, 100, 0) if targets[i] == c]
    real = torch.stack([view.data.train[i][0] for i in idx])
    fr = penultimate_features(view.teacher, view.data.normalize(real)).double()
    cosine = lambda a, b: float(a @ b / (a.norm() * b.norm()))  # noqa: E731
    for i in range(len(x)):
        for j in range(len(x)):
            assert abs(v["cosine"][i, j] - cosine(f[i], f[j])) < 1e-5
        p = torch.softmax(view.teacher(x[i:i + 1]).double(), 1)[0, c]
        assert abs(v["confidence"][i] - p) < 1e-5
        to_real = [cosine(f[i], fr[k]) for k in range(len(idx))]  # the nearest: the best of every real image
        best = max(range(len(idx)), key=to_real.__getitem__)
        assert torch.equal(v["nearest"][i], real[best].float() / 255) and abs(v["nearest_cosine"][i] - to_real[best]) < 1e-5
    assert v["real_searched"] == len(idx) == min(100, int((targets == c).sum()))


def test_the_pruning_slider_shows_the_stored_results(quick_demo):
    from dsutil.files import read_json

    summary = read_json(quick_demo / "summary.json")
    box = pruning_view(summary)
    slider, table = box.children
    for r in slider.options:
        slider.value = r
        for name, m in summary["methods"].items():
            s = next(s for s in m["students"] if s["prune_ratio"] == r)
            assert f"<td>{name}</td><td>{s['test_top1'] * 100:.1f}" in table.value


def test_the_explorer_opens_an_imported_set_next_to_the_presets(quick_demo, tmp_path):
    """A set made elsewhere and imported into the run (here the run's own real images, as PNGs) is one more
    choice of the explorer, and its view shows exactly its images of the class."""
    import shutil

    from dsutil.import_set import import_images

    run = tmp_path / "run"
    shutil.copytree(quick_demo, run)
    import_images(run, run / "recover" / "real-ipc10" / "png", "mine", device="cpu")
    view = ClassView(run)
    assert view.methods == ["sre2l", "lpld", "real", "mine"]
    mine = view.compute("mine", 3)
    real = view.compute("real", 3)
    assert torch.equal(mine["images"], real["images"]) and torch.allclose(mine["cosine"], real["cosine"])
    assert view.figure("mine", 3).axes  # drawn
