"""The label store: storage accounting against the paper and real stores, batch selection, batch reads."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from dsutil.cli import main
from dsutil.files import read_json, write_json
from dsutil.labels import (
    HEADER_BYTES_PER_FILE,
    HEADER_BYTES_PER_TOPK2_FILE,
    HEADER_BYTES_PER_TOPK_FILE,
    LabelStore,
    LabelStoreError,
    coverage,
    human_bytes,
    select_batches,
    storage_bytes,
)
from dsutil.recover import RecoverConfig, recover, recover_dir
from dsutil.relabel import RelabelConfig, relabel

GIB = 2**30
IPC, EPOCHS, BATCH = 5, 20, 10  # 50 real images in 5 full batches per epoch: 100 batches in all


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(copy_squeeze, tmp_path_factory):
    run = copy_squeeze(tmp_path_factory.mktemp("labels") / "run")
    recover(run, RecoverConfig(method="real", ipc=IPC), device="cpu", progress=False)
    return run


@pytest.fixture(scope="module")
def stores(run):
    """Real label stores of the teacher on the real images, unpruned and pruned at relabel time."""
    images = recover_dir(run, "real", IPC)
    def make(out=None, **kw):
        cfg = RelabelConfig(epochs=EPOCHS, batch_size=BATCH, mix="cutmix", **kw)
        return relabel(run, images, cfg, out=out, device="cpu", progress=False)

    # the default folder name does not tell dtypes apart, so those stores get their own
    return {0.0: make(), 0.5: make(prune_ratio=0.5), "fp32": make(dtype="fp32", out=run / "labels" / "fp32"),
            "k3": make(topk=3, topk_fill="min"), "k3-zero": make(topk=3),
            "k3-probs": make(topk=3, topk_fill="probs", topk_temperature=4.0),
            "k1-r0.5-fp32": make(topk=1, prune_ratio=0.5, dtype="fp32", topk_fill="min", out=run / "labels" / "k1"),
            "k10-mass": make(topk=10, topk_fill="mass", out=run / "labels" / "k10")}


# (prune ratio, dtype, topk, topk fill) of each store
SETTINGS = {0.0: (0.0, "fp16", None, None), 0.5: (0.5, "fp16", None, None), "fp32": (0.0, "fp32", None, None),
            "k3": (0.0, "fp16", 3, "min"), "k3-zero": (0.0, "fp16", 3, "zero"), "k3-probs": (0.0, "fp16", 3, "probs"),
            "k1-r0.5-fp32": (0.5, "fp32", 1, "min"), "k10-mass": (0.0, "fp16", 10, "mass")}


# the paper's label storage for ImageNet-1K, 300 relabel epochs, fp16 (its "GB" are GiB)
@pytest.mark.parametrize("ipc,gib", [(10, 5.67), (50, 28.33), (100, 56.67), (200, 113.33)])
def test_storage_bytes_gives_the_papers_numbers(ipc, gib):
    assert storage_bytes(1000, ipc, 300) / GIB == pytest.approx(gib, rel=0.01)
    assert storage_bytes(1000, ipc, 300, prune_ratio=0.975) / GIB == pytest.approx(gib / 40, rel=0.01)


def test_storage_bytes_formula_parts():
    logits = 300 * 200_000 * 1000 * 2  # E x N x C x bytes
    assert storage_bytes(1000, 200, 300, metadata=False) == logits
    assert storage_bytes(1000, 200, 300, prune_ratio=0.975, metadata=False) == pytest.approx(logits / 40, rel=1e-3)
    assert storage_bytes(1000, 200, 300, dtype="fp32", metadata=False) == 2 * logits
    assert storage_bytes(1000, 200, 300, dtype="bf16", metadata=False) == logits
    assert storage_bytes(1000, 200, 300, topk=10, metadata=False) == 300 * 200_000 * (10 * (2 + 2) + 2)
    assert storage_bytes(40_000, 1, 1, topk=10, dtype="fp32", metadata=False) == 40_000 * (10 * (4 + 4) + 4)
    meta = storage_bytes(1000, 200, 300) - logits
    assert 0 < meta < 0.02 * logits  # the replay recipe costs about 1% on top of the logits
    with pytest.raises(ValueError, match="dtype"):
        storage_bytes(10, 1, 1, dtype="int8")
    assert human_bytes(storage_bytes(1000, 200, 300)) == "113.16 GiB"


def test_labels_size_command(capsys):
    assert main(["labels", "size", "--classes", "1000", "--ipc", "200", "--epochs", "300", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["bytes"] == out["full_bytes"] == storage_bytes(1000, 200, 300)
    assert out["gib"] == pytest.approx(113.33, rel=0.01)
    assert out["reduction"] == 1.0
    assert (out["classes"], out["ipc"], out["epochs"], out["batch_size"], out["dtype"]) == (1000, 200, 300, 1024,
                                                                                          "fp16")
    assert main(["labels", "size", "--classes", "1000", "--ipc", "200", "--epochs", "300", "--prune-ratio",
                 "0.975", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["gib"] == pytest.approx(113.33 / 40, rel=0.01)
    assert out["reduction"] == pytest.approx(40, rel=0.01)
    assert main(["labels", "size", "--classes", "1000", "--ipc", "10", "--epochs", "300"]) == 0
    assert capsys.readouterr().out.startswith("5.66 GiB")
    assert main(["labels", "size", "--classes", "10", "--ipc", "1", "--epochs", "1", "--prune-ratio", "1"]) == 2
    assert "prune ratio must be in [0, 1)" in capsys.readouterr().err


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_a_real_store_takes_what_storage_bytes_says(stores, setting):
    """The formula counts the epoch files; ``disk_bytes`` also counts manifest.json (a few KiB, any size)."""
    store = LabelStore(stores[setting])
    r, dtype, topk, fill = SETTINGS[setting]
    files = sorted(store.path.glob("epoch*.safetensors"))
    epoch_bytes = sum(f.stat().st_size for f in files)
    assert store.disk_bytes() == epoch_bytes + (store.path / "manifest.json").stat().st_size
    want = storage_bytes(10, IPC, EPOCHS, BATCH, r, dtype, topk, topk_fill=fill or "min")
    assert abs(epoch_bytes - want) <= 0.05 * want
    kept = round(EPOCHS * 5 * (1 - r))
    assert len(store.keys()) == kept
    # without the per-file header estimate, the formula is exact for full batches
    header = HEADER_BYTES_PER_FILE if topk is None else \
        HEADER_BYTES_PER_TOPK_FILE if fill in ("min", "mass") else HEADER_BYTES_PER_TOPK2_FILE
    assert store.kept_bytes(store.keys()) == want - header * min(EPOCHS, kept)
    for f in files:  # and the header estimate holds for every file
        t = load_file(f)
        data = sum(v.numel() * v.element_size() for v in t.values())
        assert abs(f.stat().st_size - data - header) <= 32
    if topk is not None:  # the labels are really stored as K values, K int16 indices and, for min and mass, a fill
        assert (t["topk_values"].shape[1], t["topk_index"].dtype) == (topk, torch.int16)
        assert ("topk_fill" in t) == (fill in ("min", "mass")) and "logits" not in t


def test_topk_store_reads_back_the_teacher_logits_it_kept(stores):
    """K = C keeps every logit exactly; K < C keeps the K largest in place and fills the rest as documented."""
    full, k10, k3 = (LabelStore(stores[s]) for s in (0.0, "k10-mass", "k3"))
    for key in full.keys()[:7]:
        z = full.read(*key).logits  # the fp16 teacher logits
        assert torch.equal(k10.read(*key).logits, z)
        got = k3.read(*key).logits
        top = z.topk(3, 1)
        assert torch.equal(got.gather(1, top.indices), top.values)
        assert torch.equal(got.topk(3, 1).indices.sort(1).values, top.indices.sort(1).values)
        rest = torch.ones_like(z, dtype=torch.bool).scatter(1, top.indices, False)
        assert torch.equal(got[rest].view(len(z), 7), z.min(1, keepdim=True).values.expand(len(z), 7))


def test_topk_mass_fill_keeps_the_remaining_probability():
    """In float64 on random logits: the rebuilt distribution at T=1 matches the true top-K probabilities,
    and the other classes share the true remaining mass equally."""
    from dsutil.labels import topk_compress, topk_expand

    z = torch.randn(64, 20, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 4
    parts = topk_compress(z, 5, "mass")
    p_rebuilt = topk_expand(parts["topk_values"], parts["topk_index"], parts["topk_fill"], 20).double().softmax(1)
    p = z.softmax(1)
    idx = z.topk(5, 1).indices
    assert torch.allclose(p_rebuilt.gather(1, idx), p.gather(1, idx), atol=1e-5)
    rest = torch.ones_like(p, dtype=torch.bool).scatter(1, idx, False)
    want_rest = (p * rest).sum(1, keepdim=True) / 15
    assert torch.allclose(p_rebuilt[rest].view(64, 15), want_rest.expand(64, 15), atol=1e-5)


def test_select_batches_random_and_order(stores):
    store = LabelStore(stores[0.0])
    keys = store.keys()
    assert len(keys) == 100
    kept = select_batches(store, 0.6, "random", seed=1)
    assert len(kept) == len(set(kept)) == 40 and set(kept) <= set(keys) and kept == sorted(kept)
    assert kept == select_batches(store, 0.6, "random", seed=1)
    assert kept != select_batches(store, 0.6, "random", seed=2)
    assert len({e for e, _ in kept}) > 10  # batches from all over, not whole epochs
    assert select_batches(store, 0.6, "order") == keys[:40]
    assert select_batches(store, 0.0) == keys
    assert len(select_batches(store, 0.999)) == 1
    assert len(select_batches(store, 0.333)) == 67


def hand_scores(store):
    """Per-batch mean entropy and margin of the teacher's softmax, from the raw files in float64."""
    out = {"entropy": {}, "margin": {}}
    for e in sorted(store.present):
        t = load_file(store.epoch_path(e))
        p = t["logits"].double().softmax(1)
        entropy = -(p * p.log()).sum(1)
        top2 = p.topk(2, 1).values
        margin = top2[:, 0] - top2[:, 1]
        for i, b in enumerate(t["batch_ids"].tolist()):
            lo, hi = t["offsets"][i].item(), t["offsets"][i + 1].item()
            out["entropy"][(e, b)] = entropy[lo:hi].mean().item()
            out["margin"][(e, b)] = margin[lo:hi].mean().item()
    return out


@pytest.mark.parametrize("metric", ["entropy-high", "entropy-low", "margin-high", "margin-low"])
def test_select_batches_by_score_keeps_the_extreme_batches(stores, metric):
    store = LabelStore(stores[0.0])
    score = hand_scores(store)[metric.split("-")[0]]
    kept = select_batches(store, 0.7, metric)
    assert len(kept) == 30
    dropped = [k for k in store.keys() if k not in kept]
    sign = 1 if metric.endswith("high") else -1
    assert min(sign * score[k] for k in kept) >= max(sign * score[k] for k in dropped) - 1e-6
    other = metric.replace("high", "low") if sign == 1 else metric.replace("low", "high")
    assert not set(kept) & set(select_batches(store, 0.7, other))


def test_select_batches_epoch_granularity_keeps_whole_epochs(stores):
    store = LabelStore(stores[0.0])
    kept = select_batches(store, 0.5, "random", "epoch", seed=3)
    epochs = {e for e, _ in kept}
    assert len(epochs) == 10
    assert kept == [k for k in store.keys() if k[0] in epochs]
    assert kept != select_batches(store, 0.5, "random", "epoch", seed=4)
    assert select_batches(store, 0.8, "order", "epoch") == [k for k in store.keys() if k[0] < 4]
    score = hand_scores(store)["entropy"]
    per_epoch = {e: sum(score[(e, b)] for b in range(5)) / 5 for e in range(EPOCHS)}
    kept = {e for e, _ in select_batches(store, 0.75, "entropy-high", "epoch")}
    assert len(kept) == 5
    assert min(per_epoch[e] for e in kept) >= max(per_epoch[e] for e in per_epoch if e not in kept) - 1e-6
    with pytest.raises(ValueError, match="granularity"):
        select_batches(store, 0.5, granularity="image")
    with pytest.raises(ValueError, match="unknown pruning metric"):
        select_batches(store, 0.5, "loss-high")


@pytest.mark.parametrize("setting", [0.0, 0.5, "fp32"])
def test_read_returns_one_batch_as_stored(stores, setting):
    store = LabelStore(stores[setting])
    assert store.num_classes == 10
    for e in sorted(store.present):
        t = load_file(store.epoch_path(e))
        ids = t["batch_ids"].tolist()
        assert ids == store.present[e]
        for i, b in enumerate(ids):
            lo, hi = t["offsets"][i].item(), t["offsets"][i + 1].item()
            rec = store.read(e, b)
            assert (rec.epoch, rec.batch, hi - lo) == (e, b, 10)
            assert torch.equal(rec.index, t["index"][lo:hi].long())
            assert torch.equal(rec.boxes, t["boxes"][lo:hi].long())
            assert torch.equal(rec.flips, t["flips"][lo:hi].bool())
            assert torch.equal(rec.mix_perm, t["mix_perm"][lo:hi].long())
            assert torch.equal(rec.mix_box, t["mix_box"][i].long())
            assert rec.mix_lam == t["mix_lam"][i].item()
            assert rec.logits.dtype == torch.float32 and torch.equal(rec.logits, t["logits"][lo:hi].float())
    assert LabelStore(stores["fp32"]).read(0, 0).logits.dtype == torch.float32
    assert load_file(LabelStore(stores["fp32"]).epoch_path(0))["logits"].dtype == torch.float32
    assert load_file(LabelStore(stores[0.0]).epoch_path(0))["logits"].dtype == torch.float16


def test_pruned_store_lists_only_the_batches_it_holds(stores):
    store = LabelStore(stores[0.5])
    assert sum(len(v) for v in store.present.values()) == 50
    assert sorted(int(f.name[5:10]) for f in store.path.glob("epoch*.safetensors")) == sorted(store.present)
    full = LabelStore(stores[0.0])
    for k in store.keys():
        assert torch.equal(store.read(*k).logits, full.read(*k).logits)


def test_not_a_label_store(stores, tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.json not found"):
        LabelStore(tmp_path)
    future = shutil.copytree(stores[0.0], tmp_path / "future")
    manifest = read_json(future / "manifest.json")
    manifest["format_version"] = 99
    write_json(future / "manifest.json", manifest)
    with pytest.raises(LabelStoreError, match="format version 99"):
        LabelStore(future)


def official_target(z: torch.Tensor, k: int, variant: str, temperature: float, fixed_temperature: float = 1.0):
    """LPQLD's training targets in float64, written from its formulas: MR-k softmaxes the K kept logits among
    themselves (others 0); MRS-k fills the others with the row's minimum logit, then softmaxes; MS-k keeps the K
    largest probabilities at a fixed temperature (others 0, not renormalised)."""
    top = z.topk(k, 1)
    if variant == "MR":
        return torch.zeros_like(z).scatter(1, top.indices, (top.values / temperature).softmax(1))
    if variant == "MRS":
        filled = z.min(1, keepdim=True).values.expand_as(z).clone().scatter(1, top.indices, top.values)
        return (filled / temperature).softmax(1)
    p = (z / fixed_temperature).softmax(1)
    return torch.zeros_like(z).scatter(1, top.indices, p.gather(1, top.indices))


@pytest.mark.parametrize("fill,variant", [("zero", "MR"), ("min", "MRS"), ("probs", "MS")])
def test_topk_labels_train_on_lpqlds_targets(fill, variant):
    """The KL the student minimises on a rebuilt top-k label equals, in float64, the KL to LPQLD's own target."""
    from dsutil.labels import topk_compress, topk_expand
    from dsutil.train import kd_loss

    gen = torch.Generator().manual_seed(3)
    z = torch.randn(32, 12, generator=gen, dtype=torch.float64) * 3
    s = torch.randn(32, 12, generator=gen, dtype=torch.float64) * 2
    t, t_fixed = 4.0, 2.5
    parts = topk_compress(z, 4, fill, temperature=t_fixed)
    rebuilt = topk_expand(parts["topk_values"], parts["topk_index"], parts.get("topk_fill"), 12).double()
    kind = {"zero": "sparse", "min": "logits", "probs": "log_probs"}[fill]
    got = kd_loss(s, rebuilt, t, False, target=kind)
    p = official_target(z, 4, variant, t, t_fixed)
    log_q = (s / t).log_softmax(1)
    want = torch.where(p > 0, p * (p.clamp_min(1e-300).log() - log_q), 0.0).sum() / len(z)
    assert torch.isfinite(got) and got.item() == pytest.approx(want.item(), rel=1e-5)
    if fill != "min":  # the classes outside the top K get probability zero
        assert ("topk_fill" in parts) is False and torch.isneginf(rebuilt).sum() == 32 * 8


def test_pools_first_uniform_and_balanced(stores):
    """first: the first 1 - r batches in generation order; uniform: a seeded random subset; balanced: every image
    has as many stored labels as any other, within one, at every ratio (uniform leaves some with none)."""
    store = LabelStore(stores[0.0])  # 20 epochs x 5 batches of 10 of the 50 images
    keys = store.keys()
    assert select_batches(store, 0.9, pool="first") == [(0, b) for b in range(5)] + [(1, b) for b in range(5)]
    assert select_batches(store, 0.97, pool="first") == [(0, 0), (0, 1), (0, 2)]
    uniform = select_batches(store, 0.9, seed=4)
    assert uniform == select_batches(store, 0.9, pool="uniform", seed=4) != select_batches(store, 0.9, seed=5)
    assert len(uniform) == 10 and set(uniform) <= set(keys)
    for r in (0.5, 0.87, 0.9, 0.97, 0.99):
        kept = select_batches(store, r, pool="balanced", seed=1)
        assert len(kept) == max(1, round(100 * (1 - r)))
        c = coverage(store, kept, 50)
        assert c["labels_per_image_max"] - c["labels_per_image_min"] <= 1
        if len(kept) >= 5:
            assert c["images_never_labelled"] == 0
    spread = [coverage(store, select_batches(store, 0.9, seed=s), 50) for s in range(5)]
    assert max(c["labels_per_image_max"] - c["labels_per_image_min"] for c in spread) > 1


def test_relabel_time_pools_generate_the_pool_and_say_what_it_covers(run, tmp_path):
    images = recover_dir(run, "real", IPC)
    made = {pool: LabelStore(relabel(run, images, RelabelConfig(epochs=EPOCHS, batch_size=BATCH, prune_ratio=0.9,
                                                               prune_pool=pool), device="cpu", progress=False))
            for pool in ("first", "balanced")}
    assert made["first"].keys() == [(0, b) for b in range(5)] + [(1, b) for b in range(5)]
    assert made["first"].path.name.endswith("-r0.9-first")
    for store in made.values():
        assert store.manifest["images_never_labelled"] == 0.0
        assert store.manifest["labels_per_image_min"] == store.manifest["labels_per_image_max"] == 2
    uniform = LabelStore(stores_uniform := relabel(run, images, RelabelConfig(epochs=EPOCHS, batch_size=BATCH,
                                                                            prune_ratio=0.97), device="cpu",
                                                 progress=False))
    assert uniform.manifest["images_never_labelled"] == coverage(uniform, uniform.keys(), 50)["images_never_labelled"] > 0
    assert stores_uniform.name.endswith("-r0.97")
