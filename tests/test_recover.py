import signal
import subprocess
import sys
import time

import pytest
import torch

from dsutil.analysis import within_class_cosine
from dsutil.files import read_json
from dsutil.image_store import ImageSet
from dsutil.models import penultimate_features
from dsutil.recover import (
    BNTargets,
    RecoverConfig,
    load_images,
    load_squeezed,
    make_groups,
    parse_classes,
    recover,
    recover_dir,
    synthesize,
)
from dsutil.squeeze import BNStats


@pytest.mark.parametrize("method", ["lpld", "sre2l", "cross-class-classbn"])
def test_batched_engine_equals_groups_one_at_a_time(mnist_run, method):
    """In float64, so that only the engine's logic can differ: in float32, reduction-order noise
    on pixels whose gradient is about zero is amplified by Adam's normalisation (up to ~5e-3)."""
    teacher, spec, stats, info = load_squeezed(mnist_run)
    teacher = teacher.double()
    cfg = RecoverConfig(method=method, ipc=3, iterations=20, chunk_classes=4)
    shape = (1, 28, 28)
    low, high = (torch.tensor([(v - 0.1307) / 0.3081]).view(-1, 1, 1) for v in (0, 1))
    targets = BNTargets(teacher, stats, "running", torch.device("cpu"))
    run = lambda gs: synthesize(teacher, gs, targets, method, cfg, shape, (low, high), torch.device("cpu"))  # noqa
    together = run(make_groups(method, 3, range(4), seed=7, chunk_classes=4))
    alone = [run([g])[0] for g in make_groups(method, 3, range(4), seed=7, chunk_classes=4)]
    assert len(together) == len(alone) >= 3
    for a, b in zip(together, alone):
        assert (a.images - b.images).abs().max() <= 1e-5
        assert a.images.std() > 0.1  # the images did move away from each other
    assert (together[0].images - together[1].images).abs().max() > 0.1


@pytest.mark.slow
def test_lpld_images_are_more_diverse_than_sre2l(copy_squeeze, tmp_path):
    run = copy_squeeze(tmp_path / "run")
    teacher, *_ = load_squeezed(run)
    cos = {}
    for method in ("sre2l", "lpld"):
        summary = recover(run, RecoverConfig(method=method, ipc=10, iterations=150, r_bn=0.1), device="cpu", progress=False)
        # 0.90-1.0 at 150 iterations, with one thread or two (90 of 100 on an AVX-512 EPYC: 0.9 as a float32)
        assert round(summary["teacher_top1_on_images"] * 100) >= 90
        x, y, meta = load_images(recover_dir(run, method, 10))
        assert x.shape == (100, 1, 28, 28) and meta["classes"] == [str(c) for c in range(10)]
        cos[method] = within_class_cosine(penultimate_features(teacher, x), y)
        assert len(list((recover_dir(run, method, 10) / "png" / "3").glob("*.png"))) == 10
    assert cos["lpld"] < cos["sre2l"]


def test_real_baseline_picks_real_training_images(copy_squeeze, mnist, tmp_path):
    run = copy_squeeze(tmp_path / "run")
    summary = recover(run, RecoverConfig(method="real", ipc=4), device="cpu", progress=False)
    x, y, _ = load_images(recover_dir(run, "real", 4))
    assert y.tolist() == sorted(list(range(10)) * 4)
    train = mnist.normalize(mnist.train.images)
    for img, c in zip(x, y):
        match = (train - img).flatten(1).abs().max(1).values < 1e-6
        assert match.any() and (mnist.train.targets[match] == c).all()
    assert summary["teacher_top1_on_images"] > 0.9


def test_within_class_cosine_equals_a_pairwise_loop():
    torch.manual_seed(0)
    feats, labels = torch.randn(23, 7), torch.randint(0, 3, (23,))
    per_class = []
    for c in range(3):
        idx = (labels == c).nonzero().flatten().tolist()
        sims = [torch.nn.functional.cosine_similarity(feats[i].double(), feats[j].double(), dim=0)
                for a, i in enumerate(idx) for j in idx[a + 1:]]
        per_class.append(sum(sims) / len(sims))
    assert within_class_cosine(feats, labels) == pytest.approx(float(sum(per_class) / 3), abs=1e-12)


def test_clear_errors(copy_squeeze, tmp_path):
    with pytest.raises(ValueError, match="ipc=0: expected a positive"):
        RecoverConfig(ipc=0)
    with pytest.raises(ValueError, match="outside the dataset"):
        parse_classes("5:12", 10)
    with pytest.raises(FileNotFoundError, match="dsutil squeeze"):
        recover(tmp_path / "empty", RecoverConfig(ipc=1, iterations=1), device="cpu")
    run = copy_squeeze(tmp_path / "run")
    with pytest.raises(ValueError, match="outside the dataset"):
        recover(run, RecoverConfig(ipc=1, iterations=1), classes=range(8, 11), device="cpu")
    stats = BNStats.load(run / "bn_stats.safetensors")
    stats.classes, stats.class_count = stats.classes[:9], stats.class_count[:9]
    stats.class_mean = [m[:9] for m in stats.class_mean]
    stats.class_var = [v[:9] for v in stats.class_var]
    stats.save(run / "bn_stats.safetensors")
    with pytest.raises(ValueError, match="9 classes but the teacher has 10"):
        recover(run, RecoverConfig(ipc=1, iterations=1), device="cpu")


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_images(copy_squeeze, tmp_path):
    args = ["--method", "lpld", "--ipc", "2", "--iterations", "60", "--batch-images", "2", "--seed", "3",
            "--device", "cpu"]
    whole, killed = copy_squeeze(tmp_path / "whole"), copy_squeeze(tmp_path / "killed")
    cmd = [sys.executable, "-m", "dsutil.cli", "recover"]
    subprocess.run(cmd + ["--run", str(whole)] + args, check=True, capture_output=True)
    proc = subprocess.Popen(cmd + ["--run", str(killed)] + args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    units = recover_dir(killed, "lpld", 2) / "units"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(units.glob("*.safetensors"))) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(units.glob("*.safetensors")))
    assert 3 <= done < 10, f"the run was to be killed part-way, {done} of 10 units were done"
    assert not (recover_dir(killed, "lpld", 2) / "images.safetensors").exists()
    subprocess.run(cmd + ["--run", str(killed)] + args, check=True, capture_output=True)
    a, la, _ = load_images(recover_dir(whole, "lpld", 2))
    b, lb, _ = load_images(recover_dir(killed, "lpld", 2))
    assert torch.equal(la, lb) and torch.equal(a, b)
    assert read_json(recover_dir(killed, "lpld", 2) / "recover.json")["images"] == 20


def test_unit_statistics_equal_brute_force_float64():
    from dsutil.recover import unit_statistics

    torch.manual_seed(3)
    feat = torch.randn(9, 4, 5, 3, dtype=torch.float64) * 2 + torch.arange(9.0, dtype=torch.float64)[:, None, None, None]
    unit_of = torch.tensor([2, 0, 0, 1, 2, 2, 0, 1, 2])
    size = torch.bincount(unit_of).double()
    mean, var = unit_statistics(feat, unit_of, size)
    for u in range(3):
        pixels = feat[unit_of == u].transpose(0, 1).flatten(1)  # channels x (images * positions)
        assert torch.allclose(mean[u], pixels.mean(1), rtol=1e-12, atol=1e-12)
        assert torch.allclose(var[u], pixels.var(1, unbiased=False), rtol=1e-12, atol=1e-12)
    # its hand-written backward against finite differences
    small = feat[:, :2, :3, :2].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda f: unit_statistics(f, unit_of, size), (small,))
    # bf16 features (autocast on GPUs) come back as float32 statistics close to the exact ones
    mean16, var16 = unit_statistics(feat.bfloat16(), unit_of, size.float())
    assert mean16.dtype == torch.float32
    exact_mean, exact_var = unit_statistics(feat.bfloat16().double(), unit_of, size)
    assert torch.allclose(mean16.double(), exact_mean, rtol=1e-5) and torch.allclose(var16.double(), exact_var, rtol=1e-4)


def test_crop_flip_with_shifts_equals_torch_roll_of_each_crop():
    from dsutil.augment import crop_flip, rrc_boxes

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 12, 10, generator=gen)
    boxes = rrc_boxes(6, 12, 10, generator=gen)
    flips = torch.rand(6, generator=gen) < 0.5
    shifts = torch.randint(-4, 5, (6, 2), generator=gen)
    got = crop_flip(x, boxes, flips, shifts=shifts)
    crops = crop_flip(x, boxes, flips)
    for k in range(6):
        want = torch.roll(crops[k], (int(shifts[k, 0]), int(shifts[k, 1])), dims=(1, 2))
        assert torch.allclose(got[k], want, atol=1e-6)
    full = crop_flip(x[:1], torch.tensor([[0, 0, 12, 10]]), torch.tensor([False]))  # a full box is the identity
    assert torch.allclose(full, x[:1], atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", ["lpld", "sre2l"])
def test_cuda_engine_matches_the_cpu(mnist_run, method):
    """The same groups on the GPU and the CPU: equal in float64; bf16 autocast still recovers the classes
    (measured on an H100: lpld >= 0.95, sre2l 28 of 30 images after 100 iterations)."""
    teacher, spec, stats, _ = load_squeezed(mnist_run)
    low, high = (torch.tensor([(v - 0.1307) / 0.3081]).view(-1, 1, 1) for v in (0, 1))
    images = {}
    for name, device, dtype, bf16 in [("cpu", "cpu", torch.float64, False), ("cuda", "cuda", torch.float64, False),
                                      ("bf16", "cuda", torch.float32, True)]:
        dev = torch.device(device)
        model = teacher.to(dev, dtype)
        cfg = RecoverConfig(method=method, ipc=3, iterations=100, r_bn=0.1, bf16=bf16, channels_last=bf16)
        groups = synthesize(model, make_groups(method, 3, range(10), seed=1), BNTargets(model, stats, "running", dev),
                            method, cfg, (1, 28, 28), (low, high), dev)
        images[name] = (torch.cat([g.images for g in groups]), torch.cat([g.labels for g in groups]))
    assert (images["cpu"][0] - images["cuda"][0]).abs().max() <= 1e-5
    teacher = teacher.cpu().float()
    with torch.no_grad():
        assert (teacher(images["bf16"][0]).argmax(1) == images["bf16"][1]).float().mean() >= 0.9


def test_pack_groups_fills_passes_in_order_up_to_the_limit():
    from dsutil.recover import pack_groups

    groups = make_groups("lpld", 3, range(7), seed=0)  # 7 groups of 3 images
    passes = pack_groups(groups, 10)
    assert [len(p) for p in passes] == [3, 3, 1]
    assert [g for p in passes for g in p] == groups
    assert [len(p) for p in pack_groups(groups, 2)] == [1] * 7  # a group larger than the limit goes alone


def test_import_of_an_image_folder_made_elsewhere(copy_squeeze, tmp_path):
    """The PNG folder of a recovered set, with its classes reordered on disk, imports to the same 8-bit
    pixels, labels and class order; folders that do not match the classes are refused by name."""
    import shutil

    from dsutil.cli import main
    from dsutil.data import DatasetError
    from dsutil.import_set import import_images

    run = copy_squeeze(tmp_path / "run")
    recover(run, RecoverConfig(method="real", ipc=2), device="cpu", progress=False)
    src = recover_dir(run, "real", 2) / "png"
    elsewhere = tmp_path / "elsewhere"
    for cls in sorted(p.name for p in src.iterdir())[::-1]:  # made in another order and naming
        shutil.copytree(src / cls, elsewhere / cls)
        for j, f in enumerate(sorted((elsewhere / cls).iterdir())):
            f.rename(f.with_name(f"img{9 - j}.png"))
    assert main(["import", "--run", str(run), "--images", str(elsewhere), "--name", "other", "--device", "cpu"]) == 0
    got, want = (ImageSet(d / "images.safetensors") for d in (run / "recover" / "other", recover_dir(run, "real", 2)))
    assert got.classes == want.classes and torch.equal(got.labels, want.labels)
    rows = lambda s: sorted(map(tuple, s.pixels(slice(None)).flatten(1).tolist()))  # noqa: E731  (order within a class)
    assert rows(got) == rows(want)  # the same 8-bit pixels: an imported PNG set is stored losslessly
    assert read_json(run / "recover" / "other" / "recover.json")["images_per_class"] == [2] * 10

    shutil.move(str(elsewhere / "3"), str(elsewhere / "three"))
    with pytest.raises(DatasetError, match=r"matching no class: \['three'\].*no folder: \['3'\]"):
        import_images(run, elsewhere, "bad", device="cpu")
    assert not (run / "recover" / "bad").exists()


def test_the_marker_of_a_recover_that_made_nothing_does_not_block_the_next(copy_squeeze, tmp_path):
    from dsutil.files import write_json

    run = copy_squeeze(tmp_path / "run")
    write_json(recover_dir(run, "real", 1) / "stage.json",  # another key's start, with input hashes of its own
               {"hash": "another key", "finished": None, "inputs": {"teacher.safetensors": "0" * 64}})
    assert recover(run, RecoverConfig(method="real", ipc=1), device="cpu", progress=False)["images"] == 10
    with pytest.raises(ValueError, match="other settings"):  # once images exist, other settings are refused
        recover(run, RecoverConfig(method="real", ipc=1, seed=5), device="cpu", progress=False)


def test_import_of_the_official_layout_maps_new_n_to_class_n(copy_squeeze, tmp_path):
    """A folder written as the official recover code writes it (new<N>/class<N>_id<K>.jpg, JPEG at quality 75)
    imports with folder N as class N of the run's order; numbers out of range and mixed layouts are refused."""
    import shutil

    from PIL import Image

    from dsutil.data import DatasetError
    from dsutil.import_set import import_images

    run = copy_squeeze(tmp_path / "run")
    recover(run, RecoverConfig(method="real", ipc=2), device="cpu", progress=False)
    want = ImageSet(recover_dir(run, "real", 2) / "images.safetensors")
    official = tmp_path / "official"
    for i, (x, c) in enumerate(zip(want.pixels(slice(None)), want.labels.tolist())):
        folder = official / f"new{c:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(x[0].numpy()).save(folder / f"class{c:03d}_id{i % 2:03d}.jpg")  # PIL's default: quality 75
    (official / "new007").rename(official / "new7")  # the number counts, not the padding or the name's sort order
    got = ImageSet(import_images(run, official, "official", device="cpu") / "images.safetensors")
    assert got.classes == want.classes and torch.equal(got.labels, want.labels)
    diff = (got.pixels(slice(None)).float() - want.pixels(slice(None)).float()).abs()
    assert 0 < diff.mean() < 8  # the same images, through JPEG

    shutil.copytree(official / "new009", official / "new010")
    with pytest.raises(DatasetError, match=r"numbers outside that range: \[10\]"):
        import_images(run, official, "bad", device="cpu")
    shutil.rmtree(official / "new010")
    (official / "new3").mkdir()
    with pytest.raises(DatasetError, match="same class number"):
        import_images(run, official, "bad", device="cpu")
    (official / "new3").rename(official / "3")
    with pytest.raises(DatasetError, match="mix the official new<N> layout"):
        import_images(run, official, "bad", device="cpu")
