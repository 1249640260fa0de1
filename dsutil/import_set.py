"""Import a distilled set made elsewhere (an ImageFolder of PNG/JPEG files) into a run, as if recovered there.

The official LPLD and SRe2L code, and published sets, write one folder per class. Folders are matched to
the run's classes by name (wnid or folder name), never by position, so a set in another class order lands
right; a folder that matches no class, or a class without a folder, stops the import naming them.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from .files import write_json
from .image_store import READ_BATCH, ImageSet, write_image_set

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def import_images(run_dir, folder, name: str, device: str = "auto") -> Path:
    """Write ``RUN/recover/NAME`` (images.safetensors, png/, recover.json) from the ImageFolder ``folder``;
    images are converted to the teacher's channels and resized to its input size, and streamed: a set of
    any size is imported in the memory of a few hundred images."""
    import torchvision.transforms.v2.functional as TF
    from PIL import Image

    from .data import DatasetError
    from .recover import load_squeezed, predicted, write_pngs
    from .runtime import resolve_device

    folder, run_dir, dev = Path(folder), Path(run_dir), resolve_device(device)
    if not folder.is_dir():
        raise DatasetError(f"{folder} does not exist or is not a folder of class folders")
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"name={name!r}: expected a folder name for RUN/recover/<name>")
    teacher, spec, _, info = load_squeezed(run_dir, dev)
    classes = info["dataset"]["classes"]
    found = sorted(p.name for p in folder.iterdir() if p.is_dir())
    unknown, missing = sorted(set(found) - set(classes)), [c for c in classes if c not in found]
    if unknown or missing:
        raise DatasetError(f"{folder}: class folders must match the run's {len(classes)} classes by name; "
                           + (f"folders matching no class: {unknown[:10]}{' ...' if len(unknown) > 10 else ''}; "
                              if unknown else "")
                           + (f"classes with no folder: {missing[:10]}{' ...' if len(missing) > 10 else ''}"
                              if missing else ""))
    mode, size = ("L" if spec["in_channels"] == 1 else "RGB"), spec["image_size"]
    files, labels = [], []
    for c, cls in enumerate(classes):
        found = sorted(p for p in (folder / cls).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise DatasetError(f"{folder / cls} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
        files += found
        labels += [c] * len(found)

    def rows():  # uint8 pixels, READ_BATCH files at a time: the set is never whole in memory
        for a in range(0, len(files), READ_BATCH):
            batch = []
            for path in files[a:a + READ_BATCH]:
                try:
                    with Image.open(path) as img:
                        x = TF.pil_to_tensor(img.convert(mode))
                except Exception as e:
                    raise DatasetError(f"cannot read image {path} ({e})") from None
                batch.append(x if list(x.shape[-2:]) == [size, size] else TF.resize(x, [size, size], antialias=True))
            yield torch.stack(batch)

    out = run_dir / "recover" / name
    write_image_set(out / "images.safetensors", torch.tensor(labels), (spec["in_channels"], size, size), rows(),
                    {"classes": classes, "method": "import", "ipc": None, "source": str(folder.resolve()),
                     "mean": info["dataset"]["mean"], "std": info["dataset"]["std"]})
    images = ImageSet(out / "images.safetensors")
    write_pngs(images, out / "png")
    correct = predicted(teacher, images, dev) == images.labels
    counts = torch.bincount(images.labels, minlength=len(classes)).tolist()
    write_json(out / "recover.json", {"method": "import", "source": str(folder.resolve()), "images": len(images),
                                      "images_per_class": counts,
                                      "classes": classes, "teacher": spec, "pixels": "uint8",
                                      "teacher_top1_on_images": float(correct.float().mean()),
                                      "finished": time.time()})
    return out
