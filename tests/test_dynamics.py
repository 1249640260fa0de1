"""Training dynamics (EL2N, AUM, forgetting) against a one-view-at-a-time float64 loop, and pruning by them."""
import pytest
import torch

from dsutil.dynamics import Dynamics
from dsutil.labels import LabelStore, select_batches
from dsutil.recover import RecoverConfig, recover, recover_dir
from dsutil.relabel import RelabelConfig, relabel


def brute_force(steps, n, early):
    el2n, el2n_n, aum, views, forgetting, last = ([0.0] * n for _ in range(6))
    last = [None] * n
    for index, s, t, epoch in steps:
        for row, i in enumerate(index.tolist()):
            ps, pt = s[row].softmax(0), t[row].softmax(0)
            target = int(t[row].argmax())
            if epoch < early or el2n_n[i] == 0:
                el2n[i] += float(((ps - pt) ** 2).sum().sqrt())
                el2n_n[i] += 1
            others = [float(s[row, c]) for c in range(s.shape[1]) if c != target]
            aum[i] += float(s[row, target]) - max(others)
            views[i] += 1
            correct = int(s[row].argmax()) == target
            forgetting[i] += int(last[i] is True and not correct)
            last[i] = correct
    nan = float("nan")
    return ([e / k if k else nan for e, k in zip(el2n, el2n_n)], [a / v if v else nan for a, v in zip(aum, views)],
            [f if v else nan for f, v in zip(forgetting, views)])


def test_dynamics_match_a_one_view_at_a_time_loop():
    gen = torch.Generator().manual_seed(0)
    n, c, early = 12, 5, 2
    steps = []
    for epoch in range(5):
        for index in torch.randperm(n, generator=gen)[:9].split(4):  # some images unseen in some epochs
            steps.append((index, torch.randn(len(index), c, generator=gen, dtype=torch.float64),
                          torch.randn(len(index), c, generator=gen, dtype=torch.float64), epoch))
    dyn = Dynamics(n, early)
    for index, s, t, epoch in steps:
        dyn.observe(index, s.float(), t.float(), epoch)
    got = dyn.scores()
    for name, want in zip(("el2n", "aum", "forgetting"), brute_force(steps, n, early)):
        torch.testing.assert_close(got[name], torch.tensor(want, dtype=torch.float64), rtol=1e-6, atol=1e-6,
                                   equal_nan=True)
    assert got["forgetting"].nansum() > 0  # the random logits do forget


@pytest.fixture(scope="module")
def store(copy_squeeze, tmp_path_factory):
    run = copy_squeeze(tmp_path_factory.mktemp("dyn") / "run")
    recover(run, RecoverConfig(method="real", ipc=3), device="cpu", progress=False)
    return LabelStore(relabel(run, recover_dir(run, "real", 3), RelabelConfig(epochs=8, batch_size=6), device="cpu",
                              progress=False))


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("metric", ["el2n-high", "aum-low", "forgetting-high"])
def test_pruning_by_dynamics_keeps_the_batches_with_extreme_mean_image_scores(store, metric):
    kind = metric.split("-")[0]
    scores = {k: torch.rand(30, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
              for k in ("el2n", "aum", "forgetting")}
    kept = select_batches(store, 0.75, metric, image_scores=scores)
    mean = {k: float(scores[kind][store.read(*k).index].mean()) for k in store.keys()}
    order = sorted(mean, key=mean.get, reverse=metric.endswith("-high"))
    assert kept == sorted(order[:len(kept)]) and len(kept) == 10
    with pytest.raises(ValueError, match="training dynamics"):
        select_batches(store, 0.75, metric)
    partial = {k: v.clone() for k, v in scores.items()}
    partial[kind][:5] = float("nan")  # images a short scoring run never saw: each batch's mean over the others
    got = store.batch_scores(metric, partial)
    for k in store.keys():
        s = partial[kind][store.read(*k).index]
        assert got[k] == pytest.approx(float(s[~s.isnan()].mean()), abs=1e-12)
    with pytest.raises(ValueError, match="miss every image of batch"):
        select_batches(store, 0.75, metric, image_scores={k: torch.full((30,), float("nan")) for k in scores})
