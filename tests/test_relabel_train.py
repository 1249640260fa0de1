"""Relabel and student training on the real MNIST-5k teacher: exact replay, determinism, pruning, errors."""
import json
import math
import pickle
import shutil
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from dsutil.evaluate import evaluate
from dsutil.files import load_model, load_tensors, read_json, save_tensors, write_json
from dsutil.labels import LabelStore, LabelStoreError, check_prune_ratio, select_batches
from dsutil.recover import RecoverConfig, load_images, load_squeezed, recover, recover_dir
from dsutil.relabel import RelabelConfig, relabel
from dsutil.replay import epoch_records, replay
from dsutil.stage import Marker
from dsutil.train import StudentConfig, batch_schedule, kd_loss, student_identity, train_student

IPC = 5  # real images per class: 50 images in all
STUDENT = dict(width=32, lr=3e-3)  # a small student that learns MNIST-5k from 50 images in ~1 s


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(copy_squeeze, tmp_path_factory):
    """A copy of the teacher run with IPC real training images picked per class."""
    run = copy_squeeze(tmp_path_factory.mktemp("relabel") / "run")
    recover(run, RecoverConfig(method="real", ipc=IPC), device="cpu", progress=False)
    return run


@pytest.fixture(scope="module")
def images(run):
    return load_images(recover_dir(run, "real", IPC))[0]


@pytest.fixture(scope="module")
def teacher(run):
    return load_squeezed(run)[0]


@pytest.fixture(scope="module")
def make_store(run, tmp_path_factory):
    """Relabel the real images into a fresh folder per setting (cached for the module)."""
    made, root = {}, tmp_path_factory.mktemp("stores")

    def make(**settings):
        key = json.dumps(settings, sort_keys=True)
        if key not in made:
            out = root / f"store{len(made)}"
            made[key] = relabel(run, recover_dir(run, "real", IPC), RelabelConfig(**settings), out=out,
                                device="cpu", progress=False)
        return made[key]

    return make


def records(store_path):
    store = LabelStore(store_path)
    return [store.read(*k) for k in store.keys()]


def plain_crop(images, rec):
    """Crop, resize and flip of every image of a record, without mixing; independent of TF.resized_crop."""
    out = []
    for i, (top, left, h, w), flip in zip(rec.index.tolist(), rec.boxes.tolist(), rec.flips.tolist()):
        x = images[i:i + 1, :, top:top + h, left:left + w]
        x = F.interpolate(x, size=images.shape[-2:], mode="bilinear", align_corners=False, antialias=True)[0]
        out.append(x.flip(-1) if flip else x)
    return torch.stack(out)


@pytest.mark.parametrize("mix", ["none", "cutmix", "mixup"])
def test_replay_gives_back_the_stored_teacher_logits(make_store, images, teacher, mix):
    path = make_store(epochs=3, batch_size=16, mix=mix)
    store = LabelStore(path)
    assert store.keys() == [(e, b) for e in range(3) for b in range(4)]  # 50 images: 16 + 16 + 16 + 2
    for e in range(3):  # every epoch labels every image once
        assert sorted(torch.cat([store.read(e, b).index for b in range(4)]).tolist()) == list(range(50))
    for rec in records(path):
        assert rec.logits.shape == (len(rec.index), 10)
        with torch.no_grad():
            again = teacher(replay(images, rec)).half().float()
        torch.testing.assert_close(again, rec.logits, rtol=2**-10, atol=1e-3)
    lams = [r.mix_lam for r in records(path)]
    if mix == "none":
        assert all(lam == 1.0 for lam in lams)
    else:
        assert all(0 < lam < 1 for lam in lams)
        assert all(r.mix_box.any() == (mix == "cutmix") for r in records(path))


@pytest.mark.parametrize("mix", ["none", "cutmix", "mixup"])
def test_stored_records_are_the_seeded_draws(make_store, mix):
    cfg = RelabelConfig(epochs=3, batch_size=16, mix=mix)
    store = LabelStore(make_store(epochs=3, batch_size=16, mix=mix))
    for e in range(3):
        for want in epoch_records(50, (28, 28), cfg, e):
            got = store.read(e, want.batch)
            for name in ("index", "boxes", "flips", "mix_perm", "mix_box"):
                assert torch.equal(getattr(got, name), getattr(want, name).to(getattr(got, name).dtype)), name
            assert got.mix_lam == pytest.approx(want.mix_lam, rel=1e-6)


def test_replay_crops_flips_and_mixes(make_store, images):
    none = records(make_store(epochs=3, batch_size=16, mix="none"))
    for rec in none:
        x = replay(images, rec)
        torch.testing.assert_close(x, plain_crop(images, rec), rtol=0, atol=1e-4)
    x = torch.cat([replay(images, r) for r in none])
    raw = torch.cat([images[r.index] for r in none])
    changed = (x - raw).flatten(1).abs().amax(1) > 0.1
    assert changed.float().mean() > 0.9  # random resized crops: hardly any image comes back as it was
    assert any(r.flips.any() and not r.flips.all() for r in none)

    cutmix = records(make_store(epochs=3, batch_size=16, mix="cutmix"))
    pasted = 0
    for rec in cutmix:
        plain, x = plain_crop(images, rec), replay(images, rec)
        top, left, h, w = rec.mix_box.tolist()
        inside = torch.zeros(28, 28, dtype=torch.bool)
        inside[top:top + h, left:left + w] = True
        assert 0 < h * w < 28 * 28 and rec.mix_lam == pytest.approx(1 - h * w / 28**2)
        torch.testing.assert_close(x[..., inside], plain[rec.mix_perm][..., inside], rtol=0, atol=1e-4)
        torch.testing.assert_close(x[..., ~inside], plain[..., ~inside], rtol=0, atol=1e-4)
        other = rec.mix_perm != torch.arange(len(rec.index))
        pasted += int(((plain[other] - plain[rec.mix_perm][other])[..., inside].abs().amax((1, 2)) > 0.1).sum())
    assert pasted >= 10  # the box really holds another image's pixels

    for rec in records(make_store(epochs=3, batch_size=16, mix="mixup")):
        plain = plain_crop(images, rec)
        want = rec.mix_lam * plain + (1 - rec.mix_lam) * plain[rec.mix_perm]
        torch.testing.assert_close(replay(images, rec), want, rtol=0, atol=1e-4)


def test_same_seed_same_store_other_seed_other_store(make_store):
    a = make_store(epochs=3, batch_size=16, mix="cutmix")
    b = make_store(epochs=3, batch_size=16, mix="cutmix", seed=0, flip=True)  # the same settings, another folder
    c = make_store(epochs=3, batch_size=16, mix="cutmix", seed=1)
    assert a != b
    ma, mb, mc = (read_json(p / "manifest.json") for p in (a, b, c))
    assert all(0 <= t["loader_wait_seconds"] <= t["seconds"] for t in (read_json(p / "timing.json") for p in (a, b, c)))
    assert (a / "manifest.json").read_bytes() == (b / "manifest.json").read_bytes()  # no time, no folder name in it
    assert mc["settings"]["seed"] == 1 and ma["settings"]["seed"] == 0
    for e in range(3):
        ta, tb, tc = (load_file(p / f"epoch{e:05d}.safetensors") for p in (a, b, c))
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
        assert not torch.equal(ta["index"], tc["index"])
        assert not torch.equal(ta["logits"], tc["logits"])


def test_pruning_at_relabel_generates_only_the_kept_batches_unchanged(make_store):
    full = LabelStore(make_store(epochs=10, batch_size=10, mix="cutmix"))
    pruned = LabelStore(make_store(epochs=10, batch_size=10, mix="cutmix", prune_ratio=0.9))
    assert len(full.keys()) == 50
    assert len(pruned.keys()) == 5  # round(0.1 * 50) batches were ever labelled
    assert set(pruned.keys()) < set(full.keys())
    files = sorted(p.name for p in pruned.path.glob("epoch*.safetensors"))
    assert files == [f"epoch{e:05d}.safetensors" for e in sorted(pruned.present)]
    for k in pruned.keys():
        got, want = pruned.read(*k), full.read(*k)
        for name in ("index", "boxes", "flips", "mix_perm", "mix_box", "logits"):
            assert torch.equal(getattr(got, name), getattr(want, name)), name
        assert got.mix_lam == want.mix_lam
    assert pruned.manifest["batches_per_epoch"] == full.manifest["batches_per_epoch"] == 5


def test_student_trains_on_stored_labels_and_refuses_other_settings(run, make_store, mnist, tmp_path):
    store = make_store(epochs=30, batch_size=10)
    out = tmp_path / "student"
    result = train_student(run, store, StudentConfig(**STUDENT), out, device="cpu", progress=False)
    assert {p.name for p in out.iterdir()} == {"train.json", "student.safetensors", "metrics.jsonl",
                                               "dynamics.safetensors", "stage.json"}
    assert read_json(out / "train.json") == json.loads(json.dumps(result))
    assert result["epochs"] == 30 and result["kept_batches"] == result["stored_batches"] == 150
    assert result["used_batches"] == 150 and result["hard_epochs"] == 0
    assert result["label_bytes"] == LabelStore(store).kept_bytes(LabelStore(store).keys()) > 0
    assert 0 <= result["test_top1"] <= result["test_top5"] <= 1
    assert result["test_top1"] > 0.5  # chance is 0.1
    model, spec = load_model(out / "student.safetensors")
    assert spec["width"] == 32
    assert evaluate(model, mnist, "test")["top1"] == pytest.approx(result["test_top1"], abs=1e-9)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == list(range(30)) and all(m["steps"] == 5 for m in lines)
    assert lines[-1]["loss"] < lines[0]["loss"] and lines[-1]["lr"] < lines[0]["lr"]
    assert all(m["loader_wait_seconds"] >= 0 for m in lines)  # each epoch's own wait, within the loop's time
    assert sum(m["loader_wait_seconds"] for m in lines) <= lines[-1]["seconds"]

    before = (out / "student.safetensors").read_bytes()
    again = train_student(run, store, StudentConfig(**STUDENT), out, device="cpu", progress=False)
    assert again == result and (out / "student.safetensors").read_bytes() == before  # finished: not retrained
    for other in (dict(epochs=4), dict(temperature=2.0), dict(seed=3)):  # never resumed under other settings
        with pytest.raises(ValueError, match="holds a student made with other settings or inputs.*--restart"):
            train_student(run, store, StudentConfig(**STUDENT, **other), out, device="cpu", progress=False)
    assert (out / "student.safetensors").read_bytes() == before
    short = train_student(run, store, StudentConfig(**STUDENT, epochs=2), out, device="cpu", progress=False,
                          restart=True, keep_checkpoint=True)
    assert short["epochs"] == 2 and read_json(out / "train.json")["epochs"] == 2
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 1


@pytest.mark.slow
def test_interrupted_student_resumes_to_the_same_weights(run, make_store, tmp_path):
    """A store with one bad epoch file stops training part-way, deterministically; once the file is
    repaired, the rerun resumes from the checkpoint and ends where an uninterrupted run ends. With the
    default checkpoint interval no checkpoint was written yet: the rerun starts over, to the same end."""
    store = tmp_path / "store"
    shutil.copytree(make_store(epochs=30, batch_size=10), store)
    cfg = StudentConfig(**STUDENT, epochs=6, granularity="epoch")  # student epoch e replays relabel epoch e
    whole = train_student(run, store, cfg, tmp_path / "whole", device="cpu", progress=False)

    bad = store / "epoch00003.safetensors"
    good = load_file(bad)
    broken = dict(good, index=good["index"].clone())
    broken["index"][7] = 10**6  # no such image: replaying this batch fails
    save_file(broken, str(bad))
    with pytest.raises(IndexError):  # a checkpoint after every epoch
        train_student(run, store, cfg, tmp_path / "resumed", device="cpu", progress=False, checkpoint_seconds=0)
    assert torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)["epoch"] == 2
    assert not (tmp_path / "resumed" / "train.json").exists()
    with pytest.raises(IndexError):  # the default: at most every 2 minutes, so none yet
        train_student(run, store, cfg, tmp_path / "started-over", device="cpu", progress=False)
    assert len((tmp_path / "started-over" / "metrics.jsonl").read_text().splitlines()) == 3
    assert not (tmp_path / "started-over" / "checkpoint.pt").exists()

    save_file(good, str(bad))
    resumed = train_student(run, store, cfg, tmp_path / "resumed", device="cpu", progress=False)
    started_over = train_student(run, store, cfg, tmp_path / "started-over", device="cpu", progress=False)
    a = load_file(tmp_path / "whole" / "student.safetensors")
    for folder, result in (("resumed", resumed), ("started-over", started_over)):
        b = load_file(tmp_path / folder / "student.safetensors")
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
        assert result["test_top1"] == pytest.approx(whole["test_top1"], abs=2e-3)
    assert len((tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()) == 6


def test_online_student_stores_and_reads_no_labels(run, make_store, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(make_store(epochs=30, batch_size=10), store)
    for f in store.glob("epoch*.safetensors"):  # online training must not need them
        f.unlink()
    result = train_student(run, store, StudentConfig(**STUDENT, online=True), tmp_path / "online", device="cpu",
                           progress=False)
    assert result["label_bytes"] == 0
    assert result["epochs"] == 30
    assert 0.5 < result["test_top1"] <= 1  # the teacher labelled the crops on the fly
    assert read_json(tmp_path / "online" / "train.json")["settings"]["online"] is True
    with pytest.raises(LabelStoreError, match="epoch00000.safetensors"):  # stored training does need them
        train_student(run, store, StudentConfig(**STUDENT, epochs=1), tmp_path / "stored", device="cpu",
                      progress=False)


def test_batch_schedule_uses_every_kept_batch_before_repeating():
    kept = [(e, b) for e in range(10) for b in range(4) if (3 * e + b) % 4 != 1]  # 30 of 40
    sched = batch_schedule(kept, epochs=9, per_epoch=4, granularity="batch", seed=3)
    assert [len(s) for s in sched] == [4] * 9
    flat = [k for s in sched for k in s]
    assert set(flat) <= set(kept)
    for start in range(0, len(flat), len(kept)):  # each pass over the pool is a permutation of it
        chunk = flat[start:start + len(kept)]
        assert len(set(chunk)) == len(chunk)
    assert sorted(flat[:30]) == sorted(kept)
    assert sched == batch_schedule(kept, 9, 4, "batch", seed=3)
    assert sched != batch_schedule(kept, 9, 4, "batch", seed=4)
    longer = batch_schedule(kept, 12, 4, "batch", seed=3)
    assert longer[:9] == sched  # more epochs extend the schedule, so a resumed run replays the same batches


def test_batch_schedule_epoch_granularity_replays_whole_relabel_epochs():
    kept = [(1, 0), (1, 1), (1, 2), (4, 0), (4, 3), (7, 1), (7, 2), (7, 3), (7, 4)]
    sched = batch_schedule(kept, epochs=5, per_epoch=5, granularity="epoch", seed=0)
    assert len(sched) == 5
    for s, want in zip(sched, [1, 4, 7, 1, 4]):
        assert {e for e, _ in s} == {want}
        assert sorted(s) == [k for k in kept if k[0] == want]
    assert any(s != sorted(s) for s in sched)  # shuffled inside the epoch


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kd_loss_equals_the_kl_divergence(temperature):
    gen = torch.Generator().manual_seed(0)
    student, teacher_logits = torch.randn(7, 10, generator=gen) * 3, torch.randn(7, 10, generator=gen) * 3
    s, t = student.double() / temperature, teacher_logits.double() / temperature
    p_t = t.exp() / t.exp().sum(1, keepdim=True)
    p_s = s.exp() / s.exp().sum(1, keepdim=True)
    want = sum(float(p_t[i, c] * (p_t[i, c] / p_s[i, c]).log()) for i in range(7) for c in range(10)) / 7
    assert float(kd_loss(student, teacher_logits, temperature, False)) == pytest.approx(want, rel=1e-5)
    assert float(kd_loss(student, teacher_logits, temperature, True)) == pytest.approx(want * temperature**2,
                                                                                       rel=1e-5)
    assert float(kd_loss(teacher_logits, teacher_logits, temperature, False)) == pytest.approx(0, abs=1e-6)


def test_label_store_of_other_images_is_refused(copy_squeeze, run, tmp_path):
    other = copy_squeeze(tmp_path / "run")
    shutil.copytree(recover_dir(run, "real", IPC), recover_dir(other, "real", IPC))
    cfg = RelabelConfig(epochs=2, batch_size=25)
    store = relabel(other, recover_dir(other, "real", IPC), cfg, device="cpu", progress=False)
    relabel(other, recover_dir(other, "real", IPC), cfg, device="cpu", progress=False)  # a rerun: same inputs
    path = recover_dir(other, "real", IPC) / "images.safetensors"
    tensors, meta = load_tensors(path)
    save_tensors(path, {"pixels": tensors["pixels"].flip(-1), "labels": tensors["labels"]}, meta)
    with pytest.raises(LabelStoreError, match="sha256"):
        LabelStore(store).check_images(path)
    with pytest.raises(LabelStoreError, match="sha256"):
        train_student(other, store, StudentConfig(**STUDENT, epochs=1), tmp_path / "s", device="cpu",
                      progress=False)
    with pytest.raises(ValueError, match="other inputs: images.safetensors changed"):  # no reuse for new images
        relabel(other, recover_dir(other, "real", IPC), cfg, device="cpu", progress=False)
    with pytest.raises(ValueError, match="holds labels made with other settings or inputs"):
        relabel(run, recover_dir(run, "real", IPC), RelabelConfig(epochs=2, batch_size=25, seed=5), out=store,
                device="cpu", progress=False)


def test_damaged_label_stores_name_the_bad_file(run, make_store, tmp_path):
    src = make_store(epochs=3, batch_size=16)

    missing = shutil.copytree(src, tmp_path / "missing")
    (missing / "epoch00001.safetensors").unlink()
    with pytest.raises(LabelStoreError, match="epoch00001.safetensors is missing"):
        LabelStore(missing).read(1, 0)
    with pytest.raises(LabelStoreError, match="epoch00001.safetensors"):
        train_student(run, missing, StudentConfig(**STUDENT, epochs=1), tmp_path / "s1", device="cpu",
                      progress=False)
    assert LabelStore(missing).read(2, 0).logits.shape == (16, 10)  # the other epochs still read

    truncated = shutil.copytree(src, tmp_path / "truncated")
    f = truncated / "epoch00002.safetensors"
    f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])
    with pytest.raises(LabelStoreError, match="epoch00002.safetensors is truncated"):
        LabelStore(truncated).read(2, 1)
    with pytest.raises(LabelStoreError, match="epoch00002.safetensors"):
        LabelStore(truncated).check_files()
    with pytest.raises(LabelStoreError, match="epoch00002.safetensors"):
        train_student(run, truncated, StudentConfig(**STUDENT, epochs=1), tmp_path / "s2", device="cpu",
                      progress=False)
    with pytest.raises(KeyError, match="batch 9 of epoch 0"):
        LabelStore(src).read(0, 9)


class _Marker:
    """Unpickling this creates a file: proof that a pickle was executed."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_pickle_in_place_of_an_epoch_file_is_refused_unexecuted(run, make_store, tmp_path):
    store = shutil.copytree(make_store(epochs=3, batch_size=16), tmp_path / "store")
    marker = tmp_path / "pickle-was-executed"
    with open(store / "epoch00000.safetensors", "wb") as f:
        pickle.dump({"logits": _Marker(marker), "offsets": _Marker(marker)}, f)
    with pytest.raises(LabelStoreError, match="epoch00000.safetensors"):
        LabelStore(store).read(0, 0)
    with pytest.raises(LabelStoreError, match="epoch00000.safetensors"):
        train_student(run, store, StudentConfig(**STUDENT, epochs=1), tmp_path / "s", device="cpu", progress=False)
    assert not marker.exists()
    with open(store / "epoch00000.safetensors", "rb") as f:  # the file is a working pickle bomb
        pickle.load(f)
    assert marker.exists()


def test_label_store_for_another_class_count_is_refused(run, make_store, tmp_path):
    store = shutil.copytree(make_store(epochs=3, batch_size=16), tmp_path / "store")
    manifest = read_json(store / "manifest.json")
    manifest["classes"] = manifest["classes"][:9]
    write_json(store / "manifest.json", manifest)
    with pytest.raises(LabelStoreError, match="9 classes, the student's data 10"):
        train_student(run, store, StudentConfig(**STUDENT, epochs=1), tmp_path / "s", device="cpu", progress=False)


def test_prune_ratio_outside_zero_one_is_refused(run, make_store, tmp_path):
    store = LabelStore(make_store(epochs=3, batch_size=16))
    for r in (1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"prune ratio must be in \[0, 1\)"):
            check_prune_ratio(r)
        with pytest.raises(ValueError, match="prune ratio"):
            select_batches(store, r)
        with pytest.raises(ValueError, match="prune ratio"):
            RelabelConfig(prune_ratio=r)
    with pytest.raises(ValueError, match="prune ratio"):
        train_student(run, store.path, StudentConfig(prune_ratio=1.0, epochs=1), tmp_path / "s", device="cpu",
                      progress=False)
    assert check_prune_ratio(0.0) == 0.0 and check_prune_ratio(0.99) == 0.99


def test_a_copied_run_trains_students_from_its_own_images(run, make_store, tmp_path):
    """A store records its images relative to the run, so a copied run uses its own copy of them."""
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    store = copy / "labels" / "store"
    shutil.copytree(make_store(epochs=3, batch_size=10), store)
    assert read_json(store / "manifest.json")["images"] == f"recover/real-ipc{IPC}/images.safetensors"
    result = train_student(copy, store, StudentConfig(**STUDENT, epochs=1), tmp_path / "s", device="cpu",
                           progress=False)
    assert result["epochs"] == 1
    (copy / "recover" / f"real-ipc{IPC}" / "images.safetensors").unlink()  # the copy's images, not the original's
    with pytest.raises(FileNotFoundError, match=str(copy)):
        train_student(copy, store, StudentConfig(**STUDENT, epochs=1), tmp_path / "s2", device="cpu", progress=False)


def test_a_crafted_checkpoint_is_refused_unexecuted_with_its_name(run, make_store, tmp_path):
    store = make_store(epochs=3, batch_size=16)
    out = tmp_path / "student"
    out.mkdir()
    marker = tmp_path / "checkpoint-was-executed"
    torch.save({"model": _Marker(marker), "epoch": 0}, out / "checkpoint.pt")
    cfg = StudentConfig(**STUDENT, epochs=1)
    with pytest.raises(ValueError, match="holds a student made with other settings or inputs"):  # no marker: not ours
        train_student(run, store, cfg, out, device="cpu", progress=False)
    Marker(out / "stage.json").start(student_identity(store, cfg))  # as if an interrupted run of these settings
    with pytest.raises(ValueError, match="checkpoint.pt is not a student checkpoint") as e:
        train_student(run, store, cfg, out, device="cpu", progress=False)
    assert "weights_only=False" not in str(e.value) and not marker.exists()


def test_a_damaged_manifest_names_itself(make_store, tmp_path):
    store = shutil.copytree(make_store(epochs=3, batch_size=16), tmp_path / "store")
    text = (store / "manifest.json").read_text()
    (store / "manifest.json").write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match="manifest.json is not valid JSON"):
        LabelStore(store)


@pytest.mark.slow
def test_topk_of_every_class_trains_the_same_student_as_full_labels(run, make_store, tmp_path):
    """`dsutil relabel --topk C` then `dsutil train`, unchanged: the same weights as from the full store."""
    from dsutil.cli import main

    full = make_store(epochs=6, batch_size=10)
    images = recover_dir(run, "real", IPC)
    for k in (10, 3):
        assert main(["relabel", "--run", str(run), "--images", str(images), "--epochs", "6", "--batch-size", "10",
                     "--topk", str(k), "--topk-fill", "min", "--out", str(tmp_path / f"k{k}"), "--device", "cpu"]) == 0
    args = ["--width", "32", "--lr", "3e-3", "--device", "cpu"]
    for name, store in (("full", full), ("k10", tmp_path / "k10"), ("k3", tmp_path / "k3")):
        assert main(["train", "--run", str(run), "--labels", str(store), "--out", str(tmp_path / f"s-{name}"), *args]) == 0
    a, b, c = (load_file(tmp_path / f"s-{n}" / "student.safetensors") for n in ("full", "k10", "k3"))
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert any(not torch.equal(a[key], c[key]) for key in a)  # top-3 labels are other labels
    bytes_ = {n: read_json(tmp_path / f"s-{n}" / "train.json")["label_bytes"] for n in ("full", "k10", "k3")}
    assert bytes_["k3"] < bytes_["full"] < bytes_["k10"]  # 3 x (2 + 2) + 2 < 10 x 2 < 10 x (2 + 2) + 2 per label
    assert read_json(tmp_path / "s-k3" / "train.json")["test_top1"] > 0.2  # chance is 0.1 (6 short epochs)


def test_temperature_schedules_and_the_student_ratio():
    cfg = StudentConfig(temperature=20, temperature_schedule="step", temperature_step_epochs=30, temperature_gamma=0.7)
    assert [cfg.temperatures(e, 300)[0] for e in (0, 29, 30, 61, 299)] == pytest.approx(
        [20, 20, 14, 9.8, 20 * 0.7**9])
    cos = StudentConfig(temperature=20, temperature_schedule="cosine", temperature_min=2, temperature_ratio=0.5)
    assert [t for e in (0, 5, 10) for t in cos.temperatures(e, 11)] == pytest.approx([20, 10, 11, 5.5, 2, 1])
    fixed = StudentConfig(temperature=8, student_temperature=3)
    assert fixed.temperatures(7, 9) == (8, 3)
    assert StudentConfig().temperatures(5, 9) == (4.0, 4.0)


def test_kd_loss_with_a_student_temperature_of_its_own():
    gen = torch.Generator().manual_seed(1)
    s, t = torch.randn(5, 10, generator=gen, dtype=torch.float64) * 3, torch.randn(5, 10, generator=gen,
                                                                                   dtype=torch.float64) * 3
    p_t, p_s = (t / 6).softmax(1), (s / 2).softmax(1)
    want = sum(float(p_t[i, c] * (p_t[i, c] / p_s[i, c]).log()) for i in range(5) for c in range(10)) / 5
    assert float(kd_loss(s, t, 6.0, False, 2.0)) == pytest.approx(want, rel=1e-9)
    assert float(kd_loss(s, t, 6.0, True, 2.0)) == pytest.approx(want * 4, rel=1e-9)


def test_hard_loss_weighs_the_mixed_labels():
    from dsutil.train import hard_loss

    gen = torch.Generator().manual_seed(2)
    z = torch.randn(4, 10, generator=gen, dtype=torch.float64)
    y, y2 = torch.tensor([1, 2, 3, 4]), torch.tensor([5, 6, 7, 8])
    logp = z.log_softmax(1)
    want = -sum(0.3 * float(logp[i, y[i]]) + 0.7 * float(logp[i, y2[i]]) for i in range(4)) / 4
    assert float(hard_loss(z, y, y2, 0.3)) == pytest.approx(want, rel=1e-9)
    assert float(hard_loss(z, y, y2, 1.0)) == pytest.approx(-sum(float(logp[i, y[i]]) for i in range(4)) / 4)


def test_hard_epochs_read_no_labels_and_count_only_the_labels_used(run, make_store, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(make_store(epochs=30, batch_size=10, mix="cutmix"), store)
    half = train_student(run, store, StudentConfig(**STUDENT, hard_epochs=0.5), tmp_path / "half", device="cpu",
                         progress=False)
    assert half["hard_epochs"] == 15 and half["used_batches"] == 75  # 15 soft epochs of 5 batches, no repeats
    assert half["label_bytes"] == pytest.approx(LabelStore(store).kept_bytes(LabelStore(store).keys()) / 2, rel=0.02)
    kinds = [json.loads(line)["labels"] for line in (tmp_path / "half" / "metrics.jsonl").read_text().splitlines()]
    assert kinds == ["soft"] * 15 + ["hard"] * 15
    for f in store.glob("epoch*.safetensors"):  # all-hard training needs no label file
        f.unlink()
    hard = train_student(run, store, StudentConfig(**STUDENT, hard_epochs=1.0), tmp_path / "hard", device="cpu",
                         progress=False)
    assert hard["label_bytes"] == 0 and hard["used_batches"] == 0
    assert hard["test_top1"] > 0.3  # chance is 0.1: the class labels of 50 real digits teach something


def test_a_student_records_its_dynamics_and_another_prunes_by_them(run, make_store, tmp_path):
    from dsutil.dynamics import load_scores

    store = make_store(epochs=30, batch_size=10)
    full = train_student(run, store, StudentConfig(**STUDENT, epochs=10), tmp_path / "full", device="cpu",
                         progress=False)
    scores = load_scores(tmp_path / "full" / "dynamics.safetensors")
    # 10 student epochs replay 50 of the 150 stored batches; each image is in one batch of a relabel epoch
    views = torch.zeros(50)
    for e, b in (k for epoch in batch_schedule(LabelStore(store).keys(), 10, 5, "batch", 0) for k in epoch):
        views[LabelStore(store).read(e, b).index] += 1
    assert torch.equal(scores["views"].float(), views)
    assert scores["aum"].isfinite().all() and (scores["forgetting"] >= 0).all()
    cfg = StudentConfig(**STUDENT, epochs=10, prune_ratio=0.8, metric="el2n-high", scores_from=str(tmp_path / "full"))
    pruned = train_student(run, store, cfg, tmp_path / "pruned", device="cpu", progress=False)
    image_scores = {k: v for k, v in scores.items()}
    assert pruned["kept_batches"] == 30
    want = select_batches(LabelStore(store), 0.8, "el2n-high", image_scores=image_scores)
    assert pruned["label_bytes"] == LabelStore(store).kept_bytes(want)
    with pytest.raises(ValueError, match="scores_from"):
        train_student(run, store, StudentConfig(**STUDENT, metric="aum-low"), tmp_path / "x", device="cpu")
    with pytest.raises(ValueError, match="scores_from"):
        StudentConfig(metric="random", scores_from=str(tmp_path / "full"))
    assert full["test_top1"] > 0.3


def test_an_interrupted_relabel_resumes_only_its_own_whole_files(run, make_store, tmp_path):
    """A killed relabel leaves its started marker and some epoch files: a rerun with the same key keeps the whole
    ones, remakes a truncated or foreign one, and ends with the bytes of an uninterrupted run; a rerun with
    other settings is refused (or, with restart, starts over)."""
    cfg = RelabelConfig(epochs=6, batch_size=10)
    whole = make_store(epochs=6, batch_size=10)
    images = recover_dir(run, "real", IPC)
    out = tmp_path / "store"
    shutil.copytree(whole, out)
    (out / "manifest.json").unlink()  # as if killed before the end: the started marker is all that was recorded
    write_json(out / "stage.json", read_json(whole / "stage.json") | {"finished": None})
    (out / "epoch00002.safetensors").write_bytes((whole / "epoch00002.safetensors").read_bytes()[:300])
    shutil.copy(whole / "epoch00004.safetensors", out / "epoch00003.safetensors")  # the wrong batches
    (out / "epoch00005.safetensors").unlink()
    with pytest.raises(ValueError, match="holds labels made with other settings or inputs.*--restart"):
        relabel(run, images, RelabelConfig(epochs=6, batch_size=10, seed=4), out=out, device="cpu", progress=False)
    relabel(run, images, cfg, out=out, device="cpu", progress=False)
    assert read_json(out / "stage.json")["finished"] is not None
    for f in sorted(whole.glob("epoch*.safetensors")):
        assert (out / f.name).read_bytes() == f.read_bytes(), f.name
    assert LabelStore(out).manifest["present"] == LabelStore(whole).manifest["present"]
    other = relabel(run, images, RelabelConfig(epochs=3, batch_size=10, seed=4), out=out, device="cpu",
                    progress=False, restart=True)
    assert sorted(p.name for p in other.iterdir()) == ["epoch00000.safetensors", "epoch00001.safetensors",
                                                       "epoch00002.safetensors", "manifest.json", "stage.json",
                                                       "timing.json"]


def test_tensorboard_mirrors_the_metrics_file_when_asked(run, make_store, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dsutil.files import check_tensorboard

    monkeypatch.setenv("DSUTIL_TENSORBOARD", str(tmp_path / "tb"))
    for name, epochs in (("first", 3), ("second", 2)):  # the second closes the first's writer
        train_student(run, make_store(epochs=3, batch_size=10), StudentConfig(**STUDENT, epochs=epochs),
                      tmp_path / name, device="cpu", progress=False)
    for name in ("first", "second"):
        lines = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        events = EventAccumulator(str(tmp_path / "tb" / name / "metrics"))
        events.Reload()
        for key in ("loss", "lr", "loader_wait_seconds"):
            got = [(e.step, e.value) for e in events.Scalars(key)]
            assert got == [(m["epoch"], pytest.approx(m[key], rel=1e-6)) for m in lines]  # float32 in the events
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    with pytest.raises(ValueError, match="DSUTIL_TENSORBOARD=.*tensorboard is not installed"):
        check_tensorboard()


def test_batch_schedule_draws_with_replacement_from_the_pool():
    kept = [(0, 1), (2, 0), (5, 3)]
    sched = batch_schedule(kept, epochs=50, per_epoch=4, granularity="batch", seed=2, draw="replacement")
    flat = [k for s in sched for k in s]
    assert [len(s) for s in sched] == [4] * 50 and set(flat) == set(kept)
    assert any(len(set(s)) < len(s) for s in sched)  # a batch may come twice in one epoch, as the official sampler
    assert sched == batch_schedule(kept, 50, 4, "batch", seed=2, draw="replacement")
    assert sched != batch_schedule(kept, 50, 4, "batch", seed=2)


def test_warm_up_ramps_linearly_then_decays_and_1d_parameters_can_skip_decay():
    from dsutil.train import lr_schedule, make_optimizer

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.Linear(4, 2))
    cfg = StudentConfig(lr=0.1, weight_decay=0.05, warmup_epochs=2, decay_1d=False, optimizer="sgd")
    opt = make_optimizer(model, cfg)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {id(p) for p in model.parameters() if p.ndim > 1} and len(decayed) == 2
    assert len(make_optimizer(model, StudentConfig()).param_groups) == 1  # decay_1d (default): one group
    sched, rates = lr_schedule(opt, 20, 4), []
    for _ in range(20):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    ramp = [0.1 * (0.01 + 0.99 * i / 4) for i in range(4)]  # 1% of the rate, then linearly up over 4 steps
    assert rates[:4] == pytest.approx(ramp)
    assert rates[4] == pytest.approx(0.1) and rates[4:] == sorted(rates[4:], reverse=True)
    cosine = [0.05 * (1 + math.cos(math.pi * i / 16)) for i in range(16)]
    assert rates[4:] == pytest.approx(cosine)


def test_official_pool_student_records_what_its_labels_cover(run, make_store, tmp_path):
    store = make_store(epochs=20, batch_size=10)  # 5 batches of 10 of the 50 images per epoch
    cfg = StudentConfig(**STUDENT, prune_ratio=0.97, pool="first", draw="replacement", warmup_epochs=2, epochs=6)
    result = train_student(run, store, cfg, tmp_path / "first", device="cpu", progress=False)
    assert result["kept_batches"] == 3 and result["used_batches"] <= 3
    covered = {int(i) for k in [(0, 0), (0, 1), (0, 2)][:result["used_batches"]] for i in LabelStore(store).read(*k).index}
    assert result["images_never_labelled"] == pytest.approx(1 - len(covered) / 50) and result["images_never_labelled"] >= 0.4
    assert result["labels_per_image_min"] == 0
    balanced = train_student(run, store, StudentConfig(**STUDENT, prune_ratio=0.9, pool="balanced", epochs=6),
                             tmp_path / "balanced", device="cpu", progress=False)
    assert balanced["images_never_labelled"] == 0 and balanced["labels_per_image_max"] == 2
    with pytest.raises(ValueError, match="pool='first'"):
        StudentConfig(pool="first", metric="entropy-high")
