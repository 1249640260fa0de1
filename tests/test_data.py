"""Dataset loading on real data: MNIST-5k, the shared Tiny-ImageNet zips, and small folders written here."""
import hashlib
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dsutil.data
from dsutil.data import (
    DatasetError,
    FolderImages,
    ImageData,
    TensorImages,
    image_folder,
    load_dataset,
    mnist5k,
    resized,
    subset,
    tiny_imagenet,
    tiny_imagenet_val_labels,
    train_targets,
)

TINY_CLASSES = 4  # the 4th sorted wnid (n01644900) has greyscale training images; the first three have none


def hashes(ds: TensorImages) -> set[str]:
    return {hashlib.sha1(x.numpy().tobytes()).hexdigest() for x in ds.images}


# --- MNIST-5k ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mnist():
    return mnist5k(seed=0)


def test_mnist5k_split(mnist):
    assert (len(mnist.train), len(mnist.test)) == (4000, 1000)
    assert torch.bincount(train_targets(mnist.train)).tolist() == [400] * 10
    assert torch.bincount(train_targets(mnist.test)).tolist() == [100] * 10
    assert mnist.shape == (1, 28, 28) and mnist.train.images.dtype == torch.uint8
    assert not hashes(mnist.train) & hashes(mnist.test)


def test_mnist5k_seed_fixes_split(mnist):
    again, other = mnist5k(seed=0), mnist5k(seed=1)
    assert torch.equal(again.test.images, mnist.test.images)
    assert not torch.equal(other.test.images, mnist.test.images)


def test_subset_and_resized(mnist):
    small = subset(mnist, num_classes=3, per_class=7)
    assert small.classes == ["0", "1", "2"]
    assert train_targets(small.train).tolist() == [0] * 7 + [1] * 7 + [2] * 7
    assert len(small.test) == 300 and set(train_targets(small.test).tolist()) == {0, 1, 2}
    first = torch.nonzero(mnist.train.targets == 1).flatten()[:7]  # the first images of each class, in order
    assert torch.equal(small.train.images[7:14], mnist.train.images[first])

    big = resized(small, 32)
    assert big.shape == (1, 32, 32) and big.train.images.dtype == torch.uint8
    assert torch.equal(big.train.targets, small.train.targets)
    assert abs(big.train.images.float().mean() - small.train.images.float().mean()) < 2  # same picture, larger
    assert resized(small, 28) is small
    flat = ImageData("flat", TensorImages(torch.full((2, 1, 28, 28), 201, dtype=torch.uint8), torch.tensor([0, 1])),
                     small.test, small.classes, small.mean, small.std, False)
    for size in (13, 16, 64):  # rounding, not truncation, keeps a constant image constant
        assert bool((resized(flat, size).train.images == 201).all()), size
    assert load_dataset("mnist5k", num_classes=2, per_class=5, image_size=16).shape == (1, 16, 16)


# --- Tiny-ImageNet from the shared zips ----------------------------------------------------------

@pytest.fixture(scope="session")
def tiny(tiny_root) -> ImageData:
    return tiny_imagenet(num_classes=TINY_CLASSES)


def sorted_wnids(root: Path) -> list[str]:
    return sorted((root / "wnids.txt").read_text().split())


def test_tiny_val_annotations_cover_200_classes(tiny_root):
    labels = tiny_imagenet_val_labels(tiny_root)
    wnids = sorted_wnids(tiny_root)
    assert len(wnids) == 200 and len(labels) == 10_000
    assert Counter(labels.values()) == {w: 50 for w in wnids}
    assert all((tiny_root / "val" / "images" / f).is_file() for f in list(labels)[:100])


def test_tiny_train_folders_hold_500_images(tiny_root):
    present = [w for w in sorted_wnids(tiny_root) if (tiny_root / "train" / w).is_dir()]
    assert present and present == sorted_wnids(tiny_root)[:len(present)]
    assert {w: len(list((tiny_root / "train" / w / "images").glob("*.JPEG"))) for w in present} == \
        {w: 500 for w in present}


def test_tiny_loaded_subset(tiny, tiny_root):
    assert tiny.name == "tiny-imagenet" and tiny.classes == sorted_wnids(tiny_root)[:TINY_CLASSES]
    assert tiny.shape == (3, 64, 64) and tiny.train[0][0].dtype == torch.uint8 and tiny.flip
    assert tiny.train.decodes_files and tiny.test.decodes_files  # decoded on access: memory stays flat
    assert torch.bincount(tiny.train.targets).tolist() == [500] * TINY_CLASSES
    assert torch.bincount(tiny.test.targets).tolist() == [50] * TINY_CLASSES


def test_tiny_val_labels_and_pixels_match_files(tiny, tiny_root):
    labels = tiny_imagenet_val_labels(tiny_root)
    kept = sorted(f for f, w in labels.items() if w in tiny.classes)
    assert [tiny.classes[c] for c in tiny.test.targets.tolist()] == [labels[f] for f in kept]
    for i in range(0, len(kept), 17):
        with Image.open(tiny_root / "val" / "images" / kept[i]) as im:
            x = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)
        assert torch.equal(tiny.test[i][0], x), kept[i]


def test_tiny_greyscale_becomes_rgb(tiny, tiny_root):
    files = [f for w in tiny.classes for f in sorted((tiny_root / "train" / w / "images").glob("*"))]
    modes = []
    for f in files:
        with Image.open(f) as im:
            modes.append(im.mode)
    grey = [i for i, m in enumerate(modes) if m == "L"]
    assert grey, "expected greyscale training images among the first classes"
    for i in grey:
        x = tiny.train[i][0]
        with Image.open(files[i]) as im:
            grey_pixels = torch.from_numpy(np.array(im))
        assert x.shape == (3, 64, 64) and all(torch.equal(x[c], grey_pixels) for c in range(3)), files[i]


def test_tiny_per_class_and_image_size(tiny):
    few = tiny_imagenet(num_classes=TINY_CLASSES, per_class=3)
    assert train_targets(few.train).tolist() == sum([[c] * 3 for c in range(TINY_CLASSES)], [])
    assert all(torch.equal(few.train[3 + k][0], tiny.train[500 + k][0]) for k in range(3))
    assert few.test.files == tiny.test.files
    small = load_dataset("tiny-imagenet", num_classes=TINY_CLASSES, per_class=2, image_size=32)
    assert small.shape == (3, 32, 32) and small.train[0][0].dtype == torch.uint8
    # resized one at a time as they are read: the very pixels of resizing the decoded set at once (as before)
    whole = torch.stack([few.train[i][0] for i in range(len(few.train))])
    at_once = dsutil.data._resize_images(whole, 32)
    assert all(torch.equal(small.train[i][0], at_once[k]) for i, k in enumerate([0, 1, 3, 4, 6, 7, 9, 10]))
    assert all(torch.equal(small.test[i][0], dsutil.data._resize_images(tiny.test[i][0][None], 32)[0])
               for i in range(0, len(tiny.test), 37))


def test_tiny_needs_train_folders(tiny_root, tmp_path):
    """The shared zips hold all 200 classes, 500 training images each; a folder that lacks one a run needs is
    refused, naming it."""
    from dsutil.data import SHARED_TINY, _zip_parts

    wnids = sorted_wnids(tiny_root)
    held = {part: members for z in sorted(SHARED_TINY.glob("tiny-imagenet-200-train-*.zip"))
            for part, members in _zip_parts(z).items() if part != "base"}
    assert len(wnids) == 200 and sorted(held) == [f"train/{w}" for w in wnids]
    assert {len([m for m in members if m.endswith(".JPEG")]) for members in held.values()} == {500}
    root = tiny_tree(tmp_path, ["a", "b", "c"], ["a", "c"])
    with pytest.raises(DatasetError, match="train/b does not exist but num_classes=3 needs it"):
        tiny_imagenet(root, num_classes=3)


# --- small folders written here ----------------------------------------------------------------

def write_image(path: Path, size=(8, 8), mode="RGB", color=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color if mode == "RGB" else color[0]).save(path)
    return path


def tiny_tree(root: Path, wnids: list[str], with_train: list[str], annotations=True) -> Path:
    (root / "wnids.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for w in with_train:
        for k in range(2):
            write_image(root / "train" / w / "images" / f"{w}_{k}.JPEG", size=(64, 64))
    write_image(root / "val" / "images" / "val_0.JPEG", size=(64, 64), mode="L")
    if annotations:
        (root / "val" / "val_annotations.txt").write_text(f"val_0.JPEG\t{wnids[0]}\t0\t0\t10\t10\n")
    return root


def test_tiny_from_user_folder(tmp_path):
    root = tiny_tree(tmp_path, ["b", "a", "c"], ["a", "b"])
    data = tiny_imagenet(root)
    assert data.classes == ["a", "b"] and len(data.train) == 4 and train_targets(data.test).tolist() == [1]
    red = data.train[0][0].float().mean(dim=(1, 2))
    assert red[0] > 180 and red[1] < 60 and red[2] < 60  # channels in RGB order
    grey = data.test[0][0]
    assert grey.shape == (3, 64, 64) and torch.equal(grey[0], grey[1]) and torch.equal(grey[0], grey[2])
    assert abs(grey.float().mean() - 200) < 3

    write_image(root / "train" / "b" / "images" / "b_2.JPEG", size=(64, 64))  # the folder is read afresh
    assert torch.bincount(tiny_imagenet(root).train.targets).tolist() == [2, 3]


def test_tiny_classes_must_be_a_prefix(tmp_path):
    with pytest.raises(DatasetError, match="not the first 2 sorted wnids"):
        tiny_imagenet(tiny_tree(tmp_path, ["a", "b", "c"], ["a", "c"]))


def test_tiny_without_val_annotations(tmp_path):
    with pytest.raises(DatasetError, match=r"val_annotations\.txt does not exist"):
        tiny_imagenet(tiny_tree(tmp_path, ["a", "b"], ["a", "b"], annotations=False))


def test_tiny_without_wnids(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(DatasetError, match=r"wnids\.txt does not exist"):
        tiny_imagenet(tmp_path)


def zip_folder(zip_path: Path, root: Path, *parts: str) -> None:
    """Zip files and folders below root under tiny-imagenet-200/, as the shared zips are laid out."""
    with zipfile.ZipFile(zip_path, "w") as z:
        for part in parts:
            for f in [root / part, *sorted((root / part).rglob("*"))]:
                z.write(f, Path("tiny-imagenet-200") / f.relative_to(root))


def test_tiny_shared_zips_extracted_again_when_more_come(tmp_path, monkeypatch):
    src, shared = tiny_tree(tmp_path / "src", ["a", "b", "c"], ["a", "b"]), tmp_path / "shared"
    shared.mkdir()
    monkeypatch.setattr(dsutil.data, "SHARED_TINY", shared)
    monkeypatch.setenv("DSUTIL_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DatasetError, match=f"no shared Tiny-ImageNet zips.*{shared}"):
        tiny_imagenet()
    zip_folder(shared / "tiny-imagenet-200-val.zip", src, "wnids.txt", "val")
    zip_folder(shared / "tiny-imagenet-200-train-0.zip", src, "train/a")
    assert tiny_imagenet().classes == ["a"]
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["tiny-imagenet-200"]  # no temp folders left

    zip_folder(shared / "tiny-imagenet-200-train-1.zip", src, "train/b")
    assert tiny_imagenet().classes == ["a", "b"]
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["tiny-imagenet-200"]


def test_tiny_extracts_only_the_classes_a_run_needs(tiny_root, tmp_path, monkeypatch):
    monkeypatch.setenv("DSUTIL_CACHE", str(tmp_path / "cache"))
    data = tiny_imagenet(num_classes=2)
    root = tmp_path / "cache" / "tiny-imagenet-200"
    assert sorted(p.name for p in (root / "train").iterdir()) == sorted_wnids(tiny_root)[:2] == data.classes
    assert len(list((root / "val" / "images").glob("*.JPEG"))) == 10_000 and len(data.train) == 1000
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["tiny-imagenet-200"]  # no temp folders left
    def stamps():  # each extracted part's marker, written when it was renamed into place
        return {p: p.stat().st_mtime_ns for p in [*root.rglob(".dsutil-zip"), *root.glob(".dsutil-base-*")]}
    before = stamps()
    assert len(before) == 4  # the val zip's wnids/val parts, and two classes
    assert tiny_imagenet(num_classes=1).classes == data.classes[:1]
    assert stamps() == before  # nothing extracted again


def test_unknown_dataset():
    with pytest.raises(DatasetError, match="unknown dataset 'mnist'.*tiny-imagenet"):
        load_dataset("mnist")


@pytest.mark.parametrize("name", ["tiny-imagenet", "imagefolder", "cifar10"])
def test_missing_path(tmp_path, name):
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(name, tmp_path / "nowhere")


def test_cifar_without_files(tmp_path):
    with pytest.raises(DatasetError, match="cifar-100-python.*download"):
        load_dataset("cifar100", tmp_path)
    with pytest.raises(DatasetError, match="needs a data root"):
        load_dataset("cifar10")


@pytest.fixture
def folder(tmp_path) -> Path:
    # 40x20 images: red | green | blue stripes of width 10, 20, 10, so the central square is green
    stripes = np.zeros((20, 40, 3), dtype=np.uint8)
    stripes[:, :10, 0], stripes[:, 10:30, 1], stripes[:, 30:, 2] = 255, 255, 255
    for name in ("train/dog/a.png", "train/dog/b.png", "train/cat/x.png", "val/cat/y.png", "val/dog/z.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(stripes).save(tmp_path / name)
    write_image(tmp_path / "train/cat/grey.png", size=(40, 20), mode="L", color=(77,))
    (tmp_path / "train/cat/notes.txt").write_text("not an image")
    return tmp_path


def test_image_folder(folder):
    data = image_folder(folder)
    assert isinstance(data.train, FolderImages) and data.classes == ["cat", "dog"]
    assert train_targets(data.train).tolist() == [0, 0, 1, 1] and train_targets(data.test).tolist() == [0, 1]
    x, y = data.train[0]  # cat/grey.png sorts first
    assert (x.shape, x.dtype, y) == ((3, 20, 40), torch.uint8, 0) and bool((x == 77).all())
    assert data.shape == (3, 20, 40)


def test_image_folder_resizes_and_crops(folder):
    data = load_dataset("imagefolder", folder, image_size=20)
    x, _ = data.train[1]  # shorter side already 20: only the central 20x20 (green) square is kept
    assert x.shape == (3, 20, 20) and x[1].min() == 255 and x[0].max() == 0 and x[2].max() == 0
    small = image_folder(folder, image_size=8).train[1][0]
    assert small.shape == (3, 8, 8) and small[1].float().mean() > 200 and small[0].float().mean() < 30


def test_eval_resize_gives_torchvision_resize_then_centre_crop_on_held_out_images(tmp_path):
    """ImageNet-style evaluation (Resize 256 + CenterCrop 224, here 40 + 32): the val split equals torchvision's
    transforms on the same file; the train split keeps its own resize; bad values are refused."""
    import numpy as np
    import torchvision.transforms.v2 as T
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        (tmp_path / split / "a").mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(tmp_path / split / "a" / "x.png")
    data = load_dataset("imagefolder", tmp_path, image_size=32, eval_resize=40)
    with Image.open(tmp_path / "val" / "a" / "x.png") as im:
        resized = T.PILToTensor()(T.Resize(40)(im.convert("RGB")))  # PIL bilinear, shorter side 40
    assert resized.shape[-2:] == (40, 53)
    assert torch.equal(data.test[0][0], T.CenterCrop(32)(resized))
    assert not torch.equal(data.train[0][0], data.test[0][0])  # train: shorter side 32, no margin cropped
    assert data.source["eval_resize"] == 40
    with pytest.raises(DatasetError, match="eval_resize=20"):
        load_dataset("imagefolder", tmp_path, image_size=32, eval_resize=20)
    with pytest.raises(DatasetError, match="eval_resize=40"):
        load_dataset("mnist5k", eval_resize=40)


def test_image_folder_subset_keeps_targets(folder):
    data = load_dataset("imagefolder", folder, num_classes=1, per_class=1)
    assert data.classes == ["cat"] and train_targets(data.train).tolist() == [0]
    assert train_targets(data.test).tolist() == [0] and data.test[0][1] == 0


def test_image_folder_test_split_name(folder):
    (folder / "val").rename(folder / "test")
    assert len(image_folder(folder).test) == 2


def test_image_folder_empty_class(folder):
    (folder / "train" / "bird").mkdir()
    with pytest.raises(DatasetError, match=r"train/bird holds no image files"):
        image_folder(folder)


def test_image_folder_val_class_not_in_train(folder):
    write_image(folder / "val" / "fox" / "f.png")
    with pytest.raises(DatasetError, match=r"\['fox'\].*no folder"):
        image_folder(folder)


def test_image_folder_without_train(tmp_path):
    (tmp_path / "val" / "a").mkdir(parents=True)
    with pytest.raises(DatasetError, match="train does not exist"):
        image_folder(tmp_path)


@pytest.mark.parametrize("damage", ["truncated", "text"])
def test_a_damaged_image_names_its_file(folder, damage):
    path = folder / "val" / "dog" / "z.png"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"just some text, not a PNG")
    test = image_folder(folder).test
    index = [p.name for p in test.files].index("z.png")
    with pytest.raises(DatasetError, match="cannot read image .*val/dog/z.png"):
        test[index]


def test_tiny_as_an_image_folder_is_the_same_data(tiny_root, tmp_path):
    """data.tiny_imagenet_folder: links in the ImageFolder layout that load as the same classes, labels and pixels."""
    from dsutil.data import tiny_imagenet_folder

    folder = image_folder(tiny_imagenet_folder(tmp_path / "folder", tiny_root))
    tiny = tiny_imagenet(tiny_root)
    assert folder.classes == tiny.classes and len(folder.classes) >= 10
    for split in ("train", "test"):  # the same files with the same labels (validation files in another order)
        a, b = getattr(folder, split), getattr(tiny, split)
        at = {f.name: (i, int(a.targets[i])) for i, f in enumerate(a.files)}
        bt = {f.name: (i, int(b.targets[i])) for i, f in enumerate(b.files)}
        assert {k: v[1] for k, v in at.items()} == {k: v[1] for k, v in bt.items()} and len(at) == len(b)
        assert all(torch.equal(a[at[k][0]][0], b[bt[k][0]][0]) for k in sorted(bt)[::97]), split
    with pytest.raises(DatasetError, match="not empty"):
        tiny_imagenet_folder(tmp_path / "folder", tiny_root)
