"""Import what was made elsewhere: a distilled set (an ImageFolder of PNG/JPEG files) into a run, as if
recovered there, and a teacher given as a torch state dict (the official teachers) as a dsutil teacher file.

Published sets write one folder per class, matched to the run's classes by name (wnid or folder name), so a
set in another class order lands right. The official LPLD and SRe2L recover code names them ``new<N>`` (N the
class index in the run's sorted order, ``class<N>_id<K>.jpg`` inside), and those are matched by the number N,
never by sorting the names. A folder that matches no class, or a class without a folder, stops the import
naming them.
"""
from __future__ import annotations

import re
import time
from pathlib import Path

import torch

from .data import DatasetError, class_files, decode_image
from .files import claim, read_json, write_json
from .image_store import READ_BATCH, ImageSet, write_image_set
from .layout import MARKER, RECOVER_FILES, RECOVER_OUTPUTS, SQUEEZE_MARKER
from .stage import Identity, Marker, StageMismatch, input_key

OFFICIAL_FOLDER = re.compile(r"new(\d+)")  # the official recover code's class folders: new000, new001, ...


def class_folders(folder: Path, classes: list[str]) -> list[Path]:
    """The folder of each of the run's classes: by name, or by number in the official ``new<N>`` layout."""
    found = sorted(p.name for p in folder.iterdir() if p.is_dir())
    official = [n for n in found if OFFICIAL_FOLDER.fullmatch(n) and n not in classes]
    if official and len(official) < len(found):
        raise DatasetError(f"{folder}: class folders mix the official new<N> layout ({official[:3]}) with named "
                           f"folders ({[n for n in found if n not in official][:3]}); use one convention")
    if official:
        by_index = {int(OFFICIAL_FOLDER.fullmatch(n).group(1)): n for n in official}
        if len(by_index) < len(official):
            raise DatasetError(f"{folder}: two new<N> folders name the same class number")
        outside = sorted(i for i in by_index if i >= len(classes))
        missing = [i for i in range(len(classes)) if i not in by_index]
        if outside or missing:
            raise DatasetError(f"{folder}: new<N> folders must number the run's {len(classes)} classes 0.."
                               f"{len(classes) - 1} (its sorted class order); "
                               + (f"numbers outside that range: {outside[:10]}; " if outside else "")
                               + (f"classes with no folder: {missing[:10]}" if missing else ""))
        return [folder / by_index[i] for i in range(len(classes))]
    unknown, missing = sorted(set(found) - set(classes)), [c for c in classes if c not in found]
    if unknown or missing:
        raise DatasetError(f"{folder}: class folders must match the run's {len(classes)} classes by name, or be the "
                           "official new<N> folders; "
                           + (f"folders matching no class: {unknown[:10]}{' ...' if len(unknown) > 10 else ''}; "
                              if unknown else "")
                           + (f"classes with no folder: {missing[:10]}{' ...' if len(missing) > 10 else ''}"
                              if missing else ""))
    return [folder / c for c in classes]


def import_images(run_dir, folder, name: str, device: str = "auto", restart: bool = False) -> Path:
    """Write ``RUN/recover/NAME`` (images.safetensors, png/, recover.json) from the ImageFolder ``folder``;
    images are converted to the teacher's channels and resized to its input size, and streamed: a set of
    any size is imported in the memory of a few hundred images. Like a stage it keeps a marker (stage.json,
    key: the source folder and the run's teacher): a finished import of the same source is returned as it is, a
    killed one is made again from the start, and an earlier import nothing was built on is replaced."""
    from .runtime import resolve_device
    from .squeeze import load_squeezed

    folder, run_dir, dev = Path(folder), Path(run_dir), resolve_device(device)
    if not folder.is_dir():
        raise DatasetError(f"{folder} does not exist or is not a folder of class folders")
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"name={name!r}: expected a folder name for RUN/recover/<name>")
    teacher, spec, _, info = load_squeezed(run_dir, dev)
    classes = info["dataset"]["classes"]
    files, labels = [], []
    for c, class_dir in enumerate(class_folders(folder, classes)):
        found = class_files(class_dir)  # the files an ImageFolder of squeeze reads, subfolders too
        files += found
        labels += [c] * len(found)
    out = run_dir / "recover" / name
    teacher_file = run_dir / "teacher.safetensors"
    ident = Identity("import", {"source": str(folder.resolve())},
                     (input_key(run_dir / SQUEEZE_MARKER, teacher_file),), (teacher_file,))
    with claim(out, "import"):
        check_replaceable(run_dir, out)
        marker, start = Marker(out / MARKER), time.time()
        try:
            if marker.claim(ident, RECOVER_FILES, restart, "an imported set"):
                return out  # this very import, finished
        except StageMismatch as e:
            if not e.redo:
                raise
        marker.clear(RECOVER_FILES)  # an earlier import, or one killed part-way: written again in one pass
        marker.start(ident)
        _write_import(run_dir, out, folder, files, labels, classes, spec, info, teacher, dev)
        marker.finish(time.time() - start, RECOVER_OUTPUTS)
    return out


def imported(out: Path) -> bool:
    """The folder holds an import (finished, or killed before its recover.json), not a recovered set."""
    info, rec = out / "recover.json", Marker(out / MARKER).read()
    return (rec or {}).get("stage") == "import" or (info.exists() and read_json(info).get("method") == "import")


def check_replaceable(run_dir: Path, out: Path) -> None:
    """An import may replace only an earlier import that nothing was built on: a recovered set, or one that
    label stores were made from, is refused, naming what would be lost."""
    if not (out / "images.safetensors").exists() and not (out / "units").exists():
        return
    if not imported(out):
        made = read_json(out / "recover.json").get("method") if (out / "recover.json").exists() else None
        raise ValueError(f"{out} holds a set made by recover ({made or 'unfinished'}); import under another --name")
    images = (out / "images.safetensors").resolve()
    built = sorted(str(m.parent) for pattern in ("labels/*/manifest.json",)
                   for m in run_dir.glob(pattern) if (run_dir / read_json(m).get("images", "")).resolve() == images)
    if built:
        raise ValueError(f"{out} was imported before and label stores were made from it ({', '.join(built[:3])}); "
                         "import under another --name, or remove those stores first")


def _write_import(run_dir, out, folder, files, labels, classes, spec, info, teacher, dev) -> None:
    import torchvision.transforms.v2.functional as TF

    from .recover import predicted, write_pngs

    mode, size = ("L" if spec["in_channels"] == 1 else "RGB"), spec["image_size"]

    def rows():  # uint8 pixels, READ_BATCH files at a time: the set is never whole in memory
        for a in range(0, len(files), READ_BATCH):
            batch = []
            for path in files[a:a + READ_BATCH]:
                x = TF.pil_to_tensor(decode_image(path, mode))
                batch.append(x if list(x.shape[-2:]) == [size, size] else TF.resize(x, [size, size], antialias=True))
            yield torch.stack(batch)

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


def import_teacher(state_dict_path, out, arch: str, num_classes: int, image_size: int, in_channels: int = 3,
                   normalize: str | None = None) -> dict:
    """Write the torchvision ``arch`` with the weights of ``state_dict_path`` as a dsutil teacher (safetensors).

    The file is read with ``weights_only=True`` (argparse Namespaces, which torchvision's reference scripts save
    beside the weights, are allowed as plain data); a ``model`` or ``state_dict`` entry is taken when present,
    and DistributedDataParallel's ``module.`` prefix dropped. Every key must fit the architecture built for
    ``num_classes`` and ``image_size`` (64 px or less: the 3x3 stem without max-pool of the official
    Tiny-ImageNet ResNets). ``normalize`` records the mean/std the teacher expects; squeeze refuses data
    normalised otherwise.
    """
    import argparse

    from .data import NORMALIZATIONS
    from .files import save_tensors
    from .models import build_model
    from .settings import positive

    path, out = Path(state_dict_path), Path(out)
    if normalize is not None and normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize={normalize!r}: expected one of {', '.join(NORMALIZATIONS)}")
    for name, value in (("num_classes", num_classes), ("image_size", image_size), ("in_channels", in_channels)):
        positive(name, value)
    check_not_a_run_teacher(out)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # anything but tensors and plain containers is refused, never run
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path} is not a torch state dict of tensors and plain containers, so it is not read "
                         f"(dsutil loads only what cannot run code): {first}") from None
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} holds no state dict of tensors (nor one under 'model' or 'state_dict')")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    spec = {"arch": arch, "num_classes": num_classes, "in_channels": in_channels, "image_size": image_size,
            "width": 64, "depth": 3}
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"{path}: {len(bad)} tensors hold NaN or infinite values ({', '.join(bad[:3])}); a teacher "
                         "needs finite weights (was it saved after its training diverged?)")
    model = build_model(**spec)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path} does not fit a {arch} for {num_classes} classes at {image_size} px: "
                         f"{str(e).splitlines()[0]} {str(e).splitlines()[1] if len(str(e).splitlines()) > 1 else ''}") from None
    save_tensors(out, model.state_dict(), {"model": spec, "normalize": normalize, "source": str(path.resolve())})
    return spec


def check_not_a_run_teacher(out: Path) -> None:
    """``import-teacher`` writes a new file: never over a run's teacher, which sets, stores and students were made
    from, nor over any other file."""
    if (out.parent / SQUEEZE_MARKER).exists() and out.name == "teacher.safetensors":
        made = sorted(str(p.parent.relative_to(out.parent)) for p in out.parent.glob("*/*/stage.json"))
        raise ValueError(f"{out} is the teacher of the run {out.parent}" + (f", which {len(made)} stages were made "
                         f"from ({', '.join(made[:3])}{' ...' if len(made) > 3 else ''})" if made else "") +
                         "; write the imported teacher elsewhere and start a run from it with --teacher-checkpoint")
    if out.exists():
        raise ValueError(f"{out} exists; import-teacher writes a new file: choose another --out, or remove it first")
