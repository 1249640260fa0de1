"""Random and mutated manifests, safetensors files and checkpoints fed to every reader: each raises dsutil's own
clear error (ValueError and its LabelStoreError/SettingError kinds, naming the file), never another exception,
a crash or a hang, and never runs code. Presets and image files too: random and mutated YAML, sections of any
type, images of every mode, bit depth and format, damaged or random bytes; stage markers and lock files."""
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsutil.files import load_model, load_tensors, read_json, save_model
from dsutil.image_store import ImageSet
from dsutil.labels import LabelStore
from dsutil.models import build_model
from dsutil.recover import RecoverConfig, recover, recover_dir
from dsutil.relabel import RelabelConfig, relabel
from dsutil.train import _load_checkpoint

FUZZ = settings(max_examples=30, database=None, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def originals(copy_squeeze, tmp_path_factory):
    """A real label store, model file and student checkpoint: the files the mutations start from."""
    root = tmp_path_factory.mktemp("fuzz")
    run = copy_squeeze(root / "run")
    recover(run, RecoverConfig(method="real", ipc=2), device="cpu", progress=False)
    store = relabel(run, recover_dir(run, "real", 2), RelabelConfig(epochs=2, batch_size=10, topk=3), device="cpu",
                    progress=False)
    model = build_model("convnet", 10, 1, 28, width=8, depth=2)
    save_model(root / "model.safetensors", model, {"arch": "convnet", "num_classes": 10, "in_channels": 1,
                                                   "image_size": 28, "width": 8, "depth": 2})
    opt = torch.optim.AdamW(model.parameters())
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 0}, root / "checkpoint.pt")
    return {"store": store, "model": root / "model.safetensors", "checkpoint": root / "checkpoint.pt",
            "images": recover_dir(run, "real", 2) / "images.safetensors"}


def mutate(data: bytes, edits) -> bytes:
    """Overwrite, delete or truncate at the drawn positions."""
    b = bytearray(data)
    for kind, pos, value in edits:
        if not b:
            break
        pos %= len(b)
        if kind == "set":
            b[pos] = value
        elif kind == "cut":
            del b[pos:]
        else:
            del b[pos:pos + 1 + value % 16]
    return bytes(b)


EDITS = st.lists(st.tuples(st.sampled_from(["set", "cut", "del"]), st.integers(0, 10**6), st.integers(0, 255)),
                 min_size=1, max_size=6)
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=12)


def expect_clear_error(fn, path):
    """``fn`` either works or raises a ValueError that names ``path``, the very file, in full."""
    try:
        fn()
    except (ValueError, FileNotFoundError) as e:
        assert str(path) in str(e), f"error does not name {path}: {e}"


@FUZZ
@given(edits=EDITS)
def test_mutated_safetensors_and_models(originals, tmp_path_factory, edits):
    path = tmp_path_factory.mktemp("m") / "model.safetensors"
    path.write_bytes(mutate(originals["model"].read_bytes(), edits))
    expect_clear_error(lambda: load_tensors(path), path)
    expect_clear_error(lambda: load_model(path), path)


@FUZZ
@given(data=st.binary(max_size=300))
def test_random_bytes_as_safetensors_json_and_checkpoint(tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("r")
    for name, read in (("x.safetensors", load_tensors), ("manifest.json", read_json),
                       ("checkpoint.pt", lambda p: _load_checkpoint(p, "cpu"))):
        (folder / name).write_bytes(data)
        expect_clear_error(lambda read=read, name=name: read(folder / name), folder / name)


@FUZZ
@given(edits=EDITS)
def test_mutated_image_sets(originals, tmp_path_factory, edits):
    path = tmp_path_factory.mktemp("i") / "images.safetensors"
    path.write_bytes(mutate(originals["images"].read_bytes()[:4000], edits))  # the header and the first rows
    expect_clear_error(lambda: ImageSet(path)[:], path)


@FUZZ
@given(edits=EDITS)
def test_mutated_checkpoints(originals, tmp_path_factory, edits):
    path = tmp_path_factory.mktemp("c") / "checkpoint.pt"
    path.write_bytes(mutate(originals["checkpoint"].read_bytes(), edits))
    expect_clear_error(lambda: _load_checkpoint(path, "cpu"), path)


def read_everything(store_path):
    store = LabelStore(store_path)
    store.check_files()
    for key in store.keys():
        store.read(*key)


@FUZZ
@given(edits=EDITS, which=st.integers(0, 2))
def test_mutated_label_stores(originals, tmp_path_factory, edits, which):
    store = tmp_path_factory.mktemp("s") / "store"
    shutil.copytree(originals["store"], store)
    target = sorted(store.iterdir())[which]  # epoch00000, epoch00001 or manifest.json
    target.write_bytes(mutate(target.read_bytes(), edits))
    expect_clear_error(lambda: read_everything(store), target)


@FUZZ
@given(key=st.sampled_from(["format_version", "classes", "present", "epochs", "batches_per_epoch", "dtype", "topk",
                            "images", "images_sha256"]), value=JSON)
def test_manifests_with_a_field_of_any_value(originals, tmp_path_factory, key, value):
    store = tmp_path_factory.mktemp("j") / "store"
    shutil.copytree(originals["store"], store)
    manifest = json.loads((store / "manifest.json").read_text())
    (store / "manifest.json").write_text(json.dumps(manifest | {key: value}))
    expect_clear_error(lambda: read_everything(store), store / "manifest.json")


@FUZZ
@given(doc=JSON)
def test_any_json_document_as_a_manifest(tmp_path_factory, doc):
    store = tmp_path_factory.mktemp("d") / "store"
    store.mkdir()
    (store / "manifest.json").write_text(json.dumps(doc))
    expect_clear_error(lambda: LabelStore(store), store / "manifest.json")


# --- stage markers and lock files ------------------------------------------------------------------------------

def claim_store(originals, store):
    """The claim a rerun of the originals' relabel makes on ``store`` (a copy of its store)."""
    from dsutil.layout import STORE_FILES
    from dsutil.relabel import relabel_identity
    from dsutil.stage import Marker

    images = originals["images"].parent
    ident = relabel_identity(images.parents[1], images, RelabelConfig(epochs=2, batch_size=10, topk=3))
    return Marker(store / "stage.json").claim(ident, STORE_FILES, False, "labels")


@FUZZ
@given(edits=EDITS)
def test_mutated_stage_markers(originals, tmp_path_factory, edits):
    store = tmp_path_factory.mktemp("s") / "store"
    shutil.copytree(originals["store"], store)
    marker = store / "stage.json"
    marker.write_bytes(mutate(marker.read_bytes(), edits))
    expect_clear_error(lambda: claim_store(originals, store), store)


@FUZZ
@given(key=st.sampled_from(["hash", "finished", "schema", "inputs", "outputs", "seconds", "stage", "started"]),
       value=JSON)
def test_stage_markers_with_a_field_of_any_value(originals, tmp_path_factory, key, value):
    store = tmp_path_factory.mktemp("k") / "store"
    shutil.copytree(originals["store"], store)
    marker = json.loads((store / "stage.json").read_text())
    (store / "stage.json").write_text(json.dumps(marker | {key: value}))
    expect_clear_error(lambda: claim_store(originals, store), store)


@FUZZ
@given(content=st.binary(max_size=64) | JSON.map(json.dumps)
       | st.dictionaries(st.sampled_from(["pid", "host", "command"]), JSON).map(json.dumps))
def test_lock_files_of_any_content(tmp_path_factory, content):
    from dsutil.files import LOCK, claim

    folder = tmp_path_factory.mktemp("l")
    (folder / LOCK).write_bytes(content.encode() if isinstance(content, str) else content)
    try:
        with claim(folder, "fuzz"):
            assert json.loads((folder / LOCK).read_text())["pid"] == os.getpid()  # taken over: now ours
    except ValueError as e:
        assert "being written by another dsutil process" in str(e) and str(folder) in str(e), e


# --- presets and image files: what users hand in ---------------------------------------------------------------

PRESET = (Path(__file__).resolve().parents[1] / "configs" / "mnist5k.yaml").read_text()
SECTIONS = ["data", "teacher", "recover", "relabel", "student", "frontier", "quick", "methods", "prune_ratios",
            "seeds", "method_overrides", "name"]


def load_preset(path):
    from dsutil.config import load_config

    load_config(path)
    load_config(path, quick=True)


@FUZZ
@given(edits=EDITS)
def test_mutated_presets(tmp_path_factory, edits):
    path = tmp_path_factory.mktemp("y") / "preset.yaml"
    path.write_bytes(mutate(PRESET.encode(), edits))
    expect_clear_error(lambda: load_preset(path), path)


@FUZZ
@given(section=st.sampled_from(SECTIONS), value=JSON)
def test_presets_with_a_section_of_any_value(tmp_path_factory, section, value):
    import yaml

    path = tmp_path_factory.mktemp("v") / "preset.yaml"
    path.write_text(yaml.safe_dump(yaml.safe_load(PRESET) | {section: value}))
    expect_clear_error(lambda: load_preset(path), path)


@FUZZ
@given(doc=JSON | st.text(max_size=200))
def test_any_yaml_document_as_a_preset(tmp_path_factory, doc):
    import yaml

    path = tmp_path_factory.mktemp("a") / "preset.yaml"
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    expect_clear_error(lambda: load_preset(path), path)


MODES = ["1", "L", "P", "LA", "RGB", "RGBA", "CMYK", "I;16", "I", "F"]


def check_decoded(path):
    from dsutil.data import decode_image

    for mode in ("RGB", "L"):
        im = decode_image(path, mode)
        assert im.mode == mode and np.asarray(im).dtype == np.uint8


@FUZZ
@given(mode=st.sampled_from(MODES), fmt=st.sampled_from(["PNG", "TIFF", "JPEG", "GIF", "BMP", "WEBP"]),
       size=st.tuples(st.integers(1, 40), st.integers(1, 40)), seed=st.integers(0, 2**16), edits=EDITS,
       mutated=st.booleans())
def test_image_files_of_any_mode_format_and_damage(tmp_path_factory, mode, fmt, size, seed, edits, mutated):
    from PIL import Image

    rng = np.random.default_rng(seed)
    path = tmp_path_factory.mktemp("img") / f"x.{fmt.lower()}"
    base = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    im = Image.fromarray(rng.integers(0, 65536, size[::-1], dtype=np.uint16)) if mode == "I;16" else base.convert(mode)
    try:
        im.save(path, format=fmt)
    except (OSError, ValueError, KeyError):  # a mode this format cannot hold
        return
    if mutated:
        path.write_bytes(mutate(path.read_bytes(), edits))
    expect_clear_error(lambda: check_decoded(path), path)


@FUZZ
@given(data=st.binary(max_size=400), suffix=st.sampled_from([".png", ".jpg", ".tif", ".gif"]))
def test_random_bytes_as_an_image_file(tmp_path_factory, data, suffix):
    path = tmp_path_factory.mktemp("b") / f"x{suffix}"
    path.write_bytes(data)
    expect_clear_error(lambda: check_decoded(path), path)
