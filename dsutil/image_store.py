"""A distilled set on disk: one safetensors file of labels and image rows, read a batch at a time.

ImageNet-1K at IPC 200 is 30 GB of uint8 pixels (120 GB as float32): more than a process should hold.
The set is written in one pass from batches, never as one tensor, and read with seeks to the rows a
batch needs (no memory map, so rows read do not stay in the process's resident memory; the OS page
cache keeps a hot file fast). Pixels are uint8, as the reference code's PNGs are: the teacher relabels
and the student trains on exactly these 8-bit pixels. Runs made before uint8 stores kept normalised
float32 ``images`` (the recover setting ``pixels: float32`` still writes them); both read alike. The
file is standard safetensors: ``safetensors.torch.load_file`` reads it too.
"""
from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from .files import METADATA_KEY, atomic_path

# how a set's rows are kept: tensor name, safetensors dtype code, torch dtype
ENCODINGS = {"uint8": ("pixels", "U8", torch.uint8), "float32": ("images", "F32", torch.float32)}
READ_BATCH = 256  # rows per read when a whole set is streamed in order


IMAGE_FORMATS = ("lossless", "jpeg75")  # what recover keeps: rounded pixels, or the official JPEG round trip


def quantise(images: torch.Tensor, mean, std, image_format: str = "lossless") -> torch.Tensor:
    """Normalised float images -> uint8 pixels, clipped to [0, 1]: rounded to the nearest 1/255 (``lossless``),
    or as the official recover saves them (``jpeg75``): truncated to uint8, written as JPEG at PIL's default
    quality 75 and decoded again, the pixels relabel and the student then read."""
    mean, std = (torch.as_tensor(v, dtype=torch.float32).view(-1, 1, 1) for v in (mean, std))
    scaled = (images.float().cpu() * std + mean).clamp(0, 1) * 255
    if image_format == "lossless":
        return scaled.round().to(torch.uint8)
    return torch.stack([jpeg_round_trip(x) for x in scaled.to(torch.uint8)])


def jpeg_round_trip(pixels: torch.Tensor, quality: int = 75) -> torch.Tensor:
    """One C x H x W uint8 image through a JPEG file of ``quality`` and back."""
    import io

    import numpy as np
    from PIL import Image

    a = pixels.permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).save(buffer, format="JPEG", quality=quality)
    with Image.open(io.BytesIO(buffer.getvalue())) as im:
        back = np.asarray(im)
    return torch.from_numpy(back.copy()).reshape(a.shape).permute(2, 0, 1)


def write_image_set(path, labels: torch.Tensor, shape: tuple[int, int, int], batches: Iterable[torch.Tensor],
                    metadata: dict, pixels: str = "uint8") -> None:
    """Write ``labels`` and the rows that ``batches`` yield, in order, to ``path`` atomically.

    Rows are uint8 pixels (``pixels="uint8"``; ``metadata`` must then hold the normalisation ``mean`` and
    ``std``) or normalised float32 images (``"float32"``). Only one batch is in memory at a time.
    """
    name, code, dtype = ENCODINGS[pixels]
    if pixels == "uint8" and not {"mean", "std"} <= set(metadata):
        raise ValueError(f"{path}: uint8 pixels need the normalisation mean and std in the metadata")
    n, row = len(labels), math.prod(shape) * dtype.itemsize
    header = json.dumps({"labels": {"dtype": "I64", "shape": [n], "data_offsets": [0, 8 * n]},
                         name: {"dtype": code, "shape": [n, *shape], "data_offsets": [8 * n, 8 * n + n * row]},
                         "__metadata__": {METADATA_KEY: json.dumps(metadata, sort_keys=True)}},
                        separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # safetensors pads its header with spaces to 8 bytes
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(header)) + header + labels.to(torch.int64).contiguous().numpy().tobytes())
            written = 0
            for batch in batches:
                if batch.dtype != dtype or tuple(batch.shape[1:]) != tuple(shape):
                    raise ValueError(f"{path}: got a batch of {batch.dtype} {tuple(batch.shape)}, "
                                     f"expected {dtype} rows of shape {tuple(shape)}")
                f.write(batch.contiguous().cpu().numpy().tobytes())
                written += len(batch)
            if written != n:
                raise ValueError(f"{path}: {written} images were written for {n} labels")


class ImageSet:
    """A stored distilled set: labels and metadata in memory, images read on indexing.

    ``images[i]``, ``images[a:b]`` and ``images[index_tensor]`` return normalised float32 images, read
    from disk in the order asked; a forked DataLoader worker opens its own file.
    """

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"{self.path} not found: run `dsutil recover` (or `dsutil import`) to "
                                    "completion first")
        try:
            with open(self.path, "rb") as f:
                size = struct.unpack("<Q", f.read(8))[0]
                if size > os.path.getsize(self.path) - 8:
                    raise ValueError(f"its header length {size} exceeds the file")
                header = json.loads(f.read(size))
                labels, meta = header["labels"], header.get("__metadata__", {})
                self.encoding = next(e for e, (name, _, _) in ENCODINGS.items() if name in header)
                name, code, self.dtype = ENCODINGS[self.encoding]
                rows = header[name]
                n = labels["shape"][0]
                ok = (labels["dtype"] == "I64" and labels["shape"] == [n] and rows["dtype"] == code
                      and len(rows["shape"]) == 4 and rows["shape"][0] == n
                      and labels["data_offsets"][1] - labels["data_offsets"][0] == 8 * n)
                if not ok:
                    raise ValueError("labels must be int64 [N] and images [N, C, H, W] of the stated dtype")
                self.shape = tuple(rows["shape"][1:])
                self.row_bytes = math.prod(self.shape) * self.dtype.itemsize
                self.start = 8 + size + rows["data_offsets"][0]
                if rows["data_offsets"][1] - rows["data_offsets"][0] != n * self.row_bytes or \
                        os.path.getsize(self.path) < 8 + size + rows["data_offsets"][1]:
                    raise ValueError("the file is shorter than its header says (truncated?)")
                f.seek(8 + size + labels["data_offsets"][0])
                self.labels = torch.from_numpy(np.frombuffer(f.read(8 * n), dtype="<i8").copy())
            self.meta = json.loads(meta[METADATA_KEY]) if METADATA_KEY in meta else meta
            if self.encoding == "uint8":
                self.mean, self.std = (torch.tensor(self.meta[k], dtype=torch.float32).view(-1, 1, 1)
                                       for k in ("mean", "std"))
        except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError, StopIteration, struct.error) as e:
            raise ValueError(f"{self.path} is not an image set written by dsutil ({type(e).__name__}: {e})") from None
        self._file, self._pid = None, None

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def classes(self) -> list[str]:
        return self.meta["classes"]

    def __getstate__(self):  # a DataLoader worker reopens the file (an open file cannot be pickled)
        return {k: v for k, v in self.__dict__.items() if k != "_file"} | {"_file": None}

    def rows(self, index) -> torch.Tensor:
        """The stored rows (uint8 pixels or float32 images) of ``index`` (int, slice or sequence), in order."""
        if self._pid != os.getpid():  # a fork shares the parent's file offset: open our own
            self._file, self._pid = open(self.path, "rb"), os.getpid()
        if isinstance(index, slice):
            a, b, step = index.indices(len(self))
            if step == 1:  # one read for a run of rows
                self._file.seek(self.start + a * self.row_bytes)
                buf = self._file.read(max(0, b - a) * self.row_bytes)
                return torch.frombuffer(bytearray(buf), dtype=self.dtype).view(-1, *self.shape)
            index = range(a, b, step)
        single = isinstance(index, int)
        idx = [index] if single else torch.as_tensor(index).flatten().tolist()
        out = torch.empty(len(idx), *self.shape, dtype=self.dtype)
        flat = out.view(len(idx), -1).view(torch.uint8)
        for j, i in enumerate(idx):
            if not -len(self) <= i < len(self):
                raise IndexError(f"image {i} is outside {self.path} ({len(self)} images)")
            self._file.seek(self.start + (i % len(self)) * self.row_bytes)
            flat[j] = torch.frombuffer(bytearray(self._file.read(self.row_bytes)), dtype=torch.uint8)
        return out[0] if single else out

    def __getitem__(self, index) -> torch.Tensor:
        """Normalised float32 images, as the models take them."""
        x = self.rows(index)
        return (x.float() / 255 - self.mean) / self.std if self.encoding == "uint8" else x

    def pixels(self, index) -> torch.Tensor:
        """uint8 pixels in [0, 255] (float32 sets are quantised as :func:`quantise` does)."""
        x = self.rows(index)
        return x if self.encoding == "uint8" else quantise(x, self.meta["mean"], self.meta["std"])

    def batches(self, batch_size: int = READ_BATCH):
        """``(normalised images, labels)`` over the whole set, in order, one batch in memory at a time."""
        for a in range(0, len(self), batch_size):
            yield self[a:a + batch_size], self.labels[a:a + batch_size]
