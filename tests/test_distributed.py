"""Every stage under torchrun with 2 CPU processes (gloo) against one plain process: BN statistics, recover,
relabel and the student give the same results; a rank killed mid-recover, mid-relabel or mid-training is finished
by a rerun that keeps every unit, epoch file and student epoch already done."""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dsutil.files import read_json
from dsutil.image_store import ImageSet
from dsutil.squeeze import BNStats

# torchrun launches of 2 ranks and a reference process; one worker (pytest -n) holds the module's runs, which the
# recover, relabel and student tests build on in turn
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("distributed")]

ENV = os.environ | {"OMP_NUM_THREADS": "1"}  # one thread per rank: 2 ranks on 2 cores, and the same sums
ITERATIONS = "150"  # recover iterations: about half a second per LPLD unit of 2 images, long enough to kill a rank


def dsutil(*args, ranks: int = 1, wait: bool = True):
    """``python -m dsutil ARGS``, under torchrun with ``ranks`` processes when more than one."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"] \
        if ranks > 1 else [sys.executable]
    proc = subprocess.Popen([*launch, "-m", "dsutil", *map(str, args)], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    if not wait:
        return proc
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    return out


def kill_one_rank_when(proc, ready, timeout: float = 120) -> None:
    """SIGKILL torchrun's first worker once ``ready()`` holds; torchrun then stops the other and exits."""
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    os.kill(int(children[0]), signal.SIGKILL)
    proc.communicate(timeout=120)
    assert proc.returncode != 0


def stamps(folder: Path) -> dict:
    """Inode and modification time of every file: a file made again gets new ones."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.glob("*.safetensors")}


@pytest.fixture(scope="module")
def runs(copy_squeeze, tmp_path_factory):
    root = tmp_path_factory.mktemp("ranks")
    return {k: copy_squeeze(root / k) for k in ("one", "killed")}


def test_bn_statistics_and_evaluation_over_two_ranks_equal_one_process(mnist_run, tmp_path):
    teacher = mnist_run / "teacher.safetensors"
    for name, ranks in (("one", 1), ("two", 2)):
        dsutil("squeeze", "--teacher-checkpoint", teacher, "--per-class", "100", "--out", tmp_path / name, "--device", "cpu",
               ranks=ranks)
    one, two = (BNStats.load(tmp_path / n / "bn_stats.safetensors") for n in ("one", "two"))
    assert torch.equal(one.class_count, two.class_count)
    for key in ("class_mean", "class_var", "global_mean", "global_var"):
        for a, b in zip(getattr(one, key), getattr(two, key)):
            torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)
    assert read_json(tmp_path / "one" / "squeeze.json")["test_top1"] == read_json(tmp_path / "two" / "squeeze.json")["test_top1"]


def test_recover_over_two_ranks_equals_one_and_a_killed_rank_is_finished_by_a_rerun(runs):
    args = ["recover", "--method", "lpld", "--ipc", "2", "--iterations", ITERATIONS, "--batch-images", "2",
            "--device", "cpu"]
    dsutil(*args, "--run-dir", runs["one"])
    units = runs["killed"] / "recover" / "lpld-ipc2" / "units"
    proc = dsutil(*args, "--run-dir", runs["killed"], ranks=2, wait=False)
    kill_one_rank_when(proc, lambda: len(list(units.glob("*.safetensors"))) >= 2)
    before = stamps(units)
    assert 2 <= len(before) < 10 and not (units.parent / "images.safetensors").exists()
    dsutil(*args, "--run-dir", runs["killed"], ranks=2)
    after = stamps(units)
    assert len(after) == 10 and all(after[k] == v for k, v in before.items())  # nothing made twice
    want = ImageSet(runs["one"] / "recover" / "lpld-ipc2" / "images.safetensors")
    got = ImageSet(units.parent / "images.safetensors")  # every unit made by two ranks, before or after the kill
    assert torch.equal(got.labels, want.labels) and torch.equal(got.pixels(slice(None)), want.pixels(slice(None)))
    for unit in sorted(units.glob("*.safetensors")):
        torch.testing.assert_close(load_file(unit)["images"], load_file(want.path.parent / "units" / unit.name)["images"],
                                   rtol=1e-5, atol=1e-5)


def test_relabel_over_two_ranks_writes_the_same_store_and_a_killed_rank_is_finished_by_a_rerun(runs):
    dsutil("recover", "--run-dir", runs["one"], "--method", "real", "--ipc", "2", "--device", "cpu")
    shutil.copytree(runs["one"] / "recover" / "real-ipc2", runs["killed"] / "recover" / "real-ipc2")  # the same images
    args = ["relabel", "--images", "recover/real-ipc2", "--epochs", "60", "--batch-size", "10", "--workers", "0",
            "--out", "labels/s", "--device", "cpu"]

    def relabel(name, **kw):
        return dsutil(*[a if a not in ("recover/real-ipc2", "labels/s") else runs[name] / a for a in args],
                      "--run-dir", runs[name], **kw)

    relabel("one")
    store = runs["killed"] / "labels" / "s"
    proc = relabel("killed", ranks=2, wait=False)
    kill_one_rank_when(proc, lambda: len(list(store.glob("epoch*.safetensors"))) >= 4)
    before = stamps(store)
    marker = read_json(store / "stage.json")  # started, not finished
    assert marker["finished"] is None and not (store / "manifest.json").exists() and len(before) < 60
    out = relabel("killed", ranks=2)
    assert out.count("label store ") == 1, out  # two ranks ran the command; rank 0 alone speaks (dsutil.runtime.log)
    after = stamps(store)
    assert all(after[k] == v for k, v in before.items()) and read_json(store / "stage.json")["finished"]
    want = runs["one"] / "labels" / "s"  # every epoch file made by two ranks, before or after the kill
    files = sorted(p.name for p in store.glob("epoch*.safetensors"))
    assert files == sorted(p.name for p in want.glob("epoch*.safetensors")) and len(files) == 60
    assert all((store / f).read_bytes() == (want / f).read_bytes() for f in files)


def test_a_student_over_two_ranks_matches_one_process_and_is_evaluated(runs):
    """Batches of 10 split 5 + 5: with instance norm (no statistics across a batch) the DDP student equals the
    one-process one to float tolerance; a BatchNorm student (per-rank statistics on the CPU) is trained and
    evaluated too."""
    store = runs["one"] / "labels" / "s"  # made by the relabel test above
    if not store.exists():
        pytest.skip("needs the relabel test's store")
    args = ["train", "--labels", store, "--epochs", "3", "--width", "16", "--device", "cpu"]
    dsutil(*args, "--norm", "instance", "--run-dir", runs["one"], "--out", runs["one"] / "s1")
    dsutil(*args, "--norm", "instance", "--run-dir", runs["one"], "--out", runs["one"] / "s2", ranks=2)
    one, two = (load_file(runs["one"] / s / "student.safetensors") for s in ("s1", "s2"))
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5)
    a, b = (read_json(runs["one"] / s / "train.json") for s in ("s1", "s2"))
    assert b["ranks"] == 2 and abs(a["test_top1"] - b["test_top1"]) <= 0.002
    # the BatchNorm student runs 40 epochs, one of its ranks is killed after the first checkpoint, and a rerun
    # resumes from rank 0's last checkpoint: the epochs before it are not trained again
    bn2 = runs["one"] / "bn2"
    long = [*args, "--epochs", "40", "--checkpoint-seconds", "0", "--run-dir", runs["one"], "--out", bn2]
    kill_one_rank_when(dsutil(*long, ranks=2, wait=False), (bn2 / "checkpoint.pt").exists)
    done = torch.load(bn2 / "checkpoint.pt", weights_only=True)["epoch"] + 1  # epochs finished before the kill
    before = (bn2 / "metrics.jsonl").read_text().splitlines()[:done]
    dsutil(*long, ranks=2)
    bn, lines = read_json(bn2 / "train.json"), (bn2 / "metrics.jsonl").read_text().splitlines()
    assert 1 <= done < 40 and len(lines) == 40 and lines[:done] == before  # kept, with their times
    assert bn["ranks"] == 2 and 0.1 < bn["test_top1"] <= 1 and not (bn2 / "checkpoint.pt").exists()


def test_the_teacher_trains_over_two_ranks_as_rank_arithmetic_predicts(tmp_path):
    """Two gloo ranks each train on their rows (0::2, 1::2) of every batch, DDP averaging the gradients. The
    one-process reference does the same arithmetic: the mean of the two halves' losses, each half through
    BatchNorm alone (per-rank statistics on the CPU), and rank 0's BN running statistics (DDP broadcasts them)."""
    from dsutil.augment import random_shift_flip
    from dsutil.data import load_dataset
    from dsutil.files import load_model
    from dsutil.models import build_model
    from dsutil.runtime import seed_everything
    from dsutil.squeeze import TeacherConfig, train_teacher

    args = ["--dataset", "mnist5k", "--num-classes", "3", "--per-class", "40", "--epochs", "2", "--width", "8",
            "--depth", "2", "--batch-size", "16", "--device", "cpu"]
    dsutil("squeeze", *args, "--out", tmp_path / "two", ranks=2)
    two, _ = load_model(tmp_path / "two" / "teacher.safetensors")
    lines = (tmp_path / "two" / "teacher_metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and read_json(tmp_path / "two" / "squeeze.json")["teacher"]["width"] == 8

    data = load_dataset("mnist5k", num_classes=3, per_class=40)
    cfg = TeacherConfig(epochs=2, width=8, depth=2, batch_size=16)
    gen = seed_everything(cfg.seed)
    model = build_model(cfg.arch, 3, 1, 28, width=8, depth=2)
    opt = torch.optim.SGD(model.parameters(), cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay, nesterov=True)
    loader = torch.utils.data.DataLoader(data.train, batch_size=16, shuffle=True, generator=gen, drop_last=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=2 * len(loader), pct_start=0.15,
                                                anneal_strategy="cos")
    model.train()
    for _ in range(2):
        for x, y in loader:
            x = data.normalize(random_shift_flip(x.float() / 255, cfg.shift, data.flip, gen))
            start = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "tracked" in k}
            opt.zero_grad()
            (torch.nn.functional.cross_entropy(model(x[0::2]), y[0::2]) / 2).backward()
            rank0 = {k: v.clone() for k, v in model.state_dict().items() if k in start}
            model.load_state_dict(start, strict=False)  # rank 1 starts from rank 0's buffers...
            (torch.nn.functional.cross_entropy(model(x[1::2]), y[1::2]) / 2).backward()  # gradients: the mean
            model.load_state_dict(rank0, strict=False)  # ...and its own updates are overwritten
            opt.step()
            sched.step()
    one = train_teacher(data, cfg, "cpu", progress=False).state_dict()  # one process: BN over the whole batch
    gaps = {k: (float((two.state_dict()[k] - v).abs().max()), float((one[k] - two.state_dict()[k]).abs().max()))
            for k, v in model.state_dict().items() if v.is_floating_point()}
    assert all(to_arithmetic < 1e-3 for to_arithmetic, _ in gaps.values()), gaps  # float32 sums in another order
    assert sum(a for a, _ in gaps.values()) * 20 < sum(b for _, b in gaps.values()), gaps  # not just any teacher
