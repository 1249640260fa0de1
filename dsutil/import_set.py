"""Import a distilled set made elsewhere (an ImageFolder of PNG/JPEG files) into a run, as if recovered there.

The official LPLD and SRe2L code, and published sets, write one folder per class. Folders are matched to
the run's classes by name (wnid or folder name), never by position, so a set in another class order lands
right; a folder that matches no class, or a class without a folder, stops the import naming them.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from .files import save_tensors, write_json

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def import_images(run_dir, folder, name: str, device: str = "auto") -> Path:
    """Write ``RUN/recover/NAME`` (images.safetensors, png/, recover.json) from the ImageFolder ``folder``;
    images are converted to the teacher's channels and resized to its input size."""
    import torchvision.transforms.v2.functional as TF
    from PIL import Image

    from .data import DatasetError, save_image_folder
    from .recover import load_squeezed
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
    mean, std = (torch.tensor(info["dataset"][k]).view(-1, 1, 1) for k in ("mean", "std"))
    images, labels = [], []
    for c, cls in enumerate(classes):
        files = sorted(p for p in (folder / cls).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DatasetError(f"{folder / cls} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
        for path in files:
            try:
                with Image.open(path) as img:
                    x = TF.pil_to_tensor(img.convert(mode))
            except Exception as e:
                raise DatasetError(f"cannot read image {path} ({e})") from None
            if list(x.shape[-2:]) != [size, size]:
                x = TF.resize(x, [size, size], antialias=True)
            images.append((x.float() / 255 - mean) / std)
            labels.append(c)
    images, labels = torch.stack(images), torch.tensor(labels)
    out = run_dir / "recover" / name
    save_tensors(out / "images.safetensors", {"images": images, "labels": labels},
                 {"classes": classes, "method": "import", "ipc": None, "source": str(folder.resolve())})
    save_image_folder((images * std + mean).clamp(0, 1), labels, classes, out / "png")
    with torch.no_grad():
        pred = torch.cat([teacher(images[i:i + 256].to(dev)).argmax(1).cpu() for i in range(0, len(images), 256)])
    counts = torch.bincount(labels, minlength=len(classes))
    write_json(out / "recover.json", {"method": "import", "source": str(folder.resolve()), "images": len(images),
                                      "images_per_class": counts.tolist(), "classes": classes, "teacher": spec,
                                      "teacher_top1_on_images": float((pred == labels).float().mean()),
                                      "finished": time.time()})
    return out
