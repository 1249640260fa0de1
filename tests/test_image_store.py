"""The streamed image store: what is read equals what was written, in any order, for both encodings; it is
standard safetensors, the same bytes on a rerun, never half-written; and a student trained from uint8 pixels
streamed off disk equals one trained from the same pixels held as float32."""
import hashlib

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dsutil.image_store import ImageSet, quantise, write_image_set
from dsutil.labels import LabelStore
from dsutil.recover import RecoverConfig, recover, recover_dir
from dsutil.relabel import RelabelConfig, relabel
from dsutil.train import StudentConfig, train_student

MEAN, STD = [0.48, 0.45, 0.40], [0.23, 0.22, 0.26]
META = {"classes": ["a", "b", "c"], "mean": MEAN, "std": STD}


def random_set(n=37, shape=(3, 5, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8), torch.randint(0, 3, (n,), generator=g)


def write(path, pixels, labels, batch=8, encoding="uint8"):
    write_image_set(path, labels, tuple(pixels.shape[1:]), pixels.split(batch), META, encoding)


def test_rows_read_back_in_any_order_and_normalise_like_float64(tmp_path):
    pixels, labels = random_set()
    write(tmp_path / "set.safetensors", pixels, labels)
    images = ImageSet(tmp_path / "set.safetensors")
    assert len(images) == 37 and images.shape == (3, 5, 4) and images.classes == ["a", "b", "c"]
    assert torch.equal(images.labels, labels)
    order = torch.randperm(37, generator=torch.Generator().manual_seed(1))
    assert torch.equal(images.pixels(order), pixels[order])
    assert torch.equal(images.pixels(slice(3, 30)), pixels[3:30]) and torch.equal(images.pixels(slice(0, 37, 5)),
                                                                                  pixels[::5])
    assert torch.equal(images.pixels(-1), pixels[-1]) and torch.equal(images.pixels([4, 4, 2]), pixels[[4, 4, 2]])
    want = (pixels.double() / 255 - torch.tensor(MEAN).double().view(-1, 1, 1)) / torch.tensor(STD).double().view(-1, 1, 1)
    torch.testing.assert_close(images[order], want[order].float(), rtol=0, atol=1e-6)
    with pytest.raises(IndexError, match="outside"):
        images[[37]]
    # standard safetensors: the library reads the same tensors
    assert torch.equal(load_file(tmp_path / "set.safetensors")["pixels"], pixels)


def test_float32_sets_round_trip_exactly_and_quantise_like_the_uint8_ones(tmp_path):
    pixels, labels = random_set(seed=2)
    images = (pixels.float() / 255 - torch.tensor(MEAN).view(-1, 1, 1)) / torch.tensor(STD).view(-1, 1, 1)
    write_image_set(tmp_path / "f.safetensors", labels, (3, 5, 4), images.split(10), META, "float32")
    stored = ImageSet(tmp_path / "f.safetensors")
    assert stored.encoding == "float32" and torch.equal(stored[:], images)
    assert torch.equal(stored.pixels(slice(None)), pixels) and torch.equal(quantise(images, MEAN, STD), pixels)


def test_same_rows_same_bytes_and_a_bad_write_leaves_nothing(tmp_path):
    pixels, labels = random_set()
    write(tmp_path / "a.safetensors", pixels, labels, batch=8)
    write(tmp_path / "b.safetensors", pixels, labels, batch=5)  # other batching, same file
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    assert digest(tmp_path / "a.safetensors") == digest(tmp_path / "b.safetensors")
    with pytest.raises(ValueError, match="36 images were written for 37 labels"):
        write(tmp_path / "c.safetensors", pixels[:36], labels)
    with pytest.raises(ValueError, match="expected torch.uint8 rows"):
        write(tmp_path / "c.safetensors", pixels.float(), labels)
    assert not (tmp_path / "c.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_damaged_sets_name_the_file(tmp_path):
    pixels, labels = random_set()
    write(tmp_path / "set.safetensors", pixels, labels)
    data = (tmp_path / "set.safetensors").read_bytes()
    for name, content in (("cut.safetensors", data[:-7]), ("noise.safetensors", np.random.default_rng(0).bytes(900)),
                          ("empty.safetensors", b"")):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=name):
            ImageSet(tmp_path / name)
    with pytest.raises(FileNotFoundError, match="dsutil recover"):
        ImageSet(tmp_path / "missing.safetensors")


@pytest.mark.usefixtures("one_thread")
def test_a_student_from_streamed_uint8_pixels_equals_one_from_the_same_pixels_as_float32(copy_squeeze, tmp_path):
    """Recover real images as uint8, write the same pixels as a float32 set, relabel both and train a student
    on each: the label logits and the students' weights are equal."""
    run = copy_squeeze(tmp_path / "run")
    recover(run, RecoverConfig(method="real", ipc=3), device="cpu", progress=False)
    stream = ImageSet(recover_dir(run, "real", 3) / "images.safetensors")
    assert stream.encoding == "uint8"
    floats = run / "recover" / "floats"
    write_image_set(floats / "images.safetensors", stream.labels, stream.shape, [stream[:]], stream.meta, "float32")
    cfg = RelabelConfig(epochs=2, batch_size=10)
    stores = [relabel(run, folder, cfg, device="cpu", progress=False, workers=w)
              for folder, w in ((recover_dir(run, "real", 3), 1), (floats, 0))]
    for key in LabelStore(stores[0]).keys():
        torch.testing.assert_close(LabelStore(stores[0]).read(*key).logits, LabelStore(stores[1]).read(*key).logits,
                                   rtol=0, atol=0)
    students = [train_student(run, s, StudentConfig(width=16, epochs=2, workers=w), tmp_path / f"s{w}", device="cpu",
                              progress=False, keep_checkpoint=True) for s, w in zip(stores, (1, 0))]
    assert students[0]["test_top1"] == students[1]["test_top1"]
    a, b = (load_file(tmp_path / f"s{w}" / "student.safetensors") for w in (1, 0))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_a_grid_reads_the_first_images_of_each_shown_class(tmp_path):
    """plots.grid_images: the first ``per_class`` rows of each shown class, in [0, 1], the pixels written."""
    from dsutil.data import ImageData
    from dsutil.plots import grid_images

    pixels, labels = random_set(n=40)
    write(tmp_path / "set.safetensors", pixels, labels)
    data = ImageData("d", None, None, META["classes"], tuple(MEAN), tuple(STD), flip=True)
    x, y = grid_images(ImageSet(tmp_path / "set.safetensors"), data, per_class=3, shown=[2, 0])
    rows = [i for c in (2, 0) for i in [k for k in range(40) if labels[k] == c][:3]]
    assert y.tolist() == labels[rows].tolist() and len(rows) == 6
    assert torch.allclose(x.double(), pixels[rows].double() / 255, atol=1e-6)
