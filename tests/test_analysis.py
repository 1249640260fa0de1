"""Diversity and calibration measures against brute-force references on random inputs."""
import math

import pytest
import torch

from dsutil.analysis import expected_calibration_error, feature_variance, reliability, vendi_score


def test_ece_equals_a_loop_over_samples():
    torch.manual_seed(0)
    logits, labels = torch.randn(500, 7) * 3, torch.randint(0, 7, (500,))
    probs = logits.double().softmax(1)
    bins = [[] for _ in range(10)]
    for p, y in zip(probs, labels):
        conf, pred = p.max(0)
        b = min(max(math.ceil(float(conf) * 10) - 1, 0), 9)
        bins[b].append((float(conf), float(pred == y)))
    ref = sum(len(b) / 500 * abs(sum(c for _, c in b) / len(b) - sum(f for f, _ in b) / len(b)) for b in bins if b)
    assert expected_calibration_error(logits, labels, bins=10) == pytest.approx(ref, abs=1e-12)
    r = reliability(logits, labels, bins=10)
    assert r["count"].sum() == 500


def test_vendi_score_counts_distinct_directions():
    assert vendi_score(torch.eye(6)) == pytest.approx(6, rel=1e-9)  # orthogonal: 6 distinct
    assert vendi_score(torch.ones(5, 3)) == pytest.approx(1, rel=1e-9)  # identical: 1
    two = torch.cat([torch.eye(2)] * 3)  # two directions, three copies each
    assert vendi_score(two) == pytest.approx(2, rel=1e-9)


def test_feature_variance_equals_mean_squared_distance_to_the_centroid():
    torch.manual_seed(1)
    x = torch.randn(30, 5)
    z = [v / v.norm() for v in x.double()]
    mu = sum(z) / len(z)
    ref = sum(float(((v - mu) ** 2).sum()) for v in z) / len(z)
    assert feature_variance(x) == pytest.approx(ref, rel=1e-10)


def test_bn_class_gaps_equal_loops_over_raw_activations():
    from dsutil.analysis import bn_class_gaps
    from dsutil.squeeze import BNStats

    torch.manual_seed(2)
    counts, shapes = [7, 4, 9], [3, 5]  # images per class; channels per layer
    acts = [[torch.randn(n, ch, 2, 2) * (c + 1) + c for c, n in enumerate(counts)] for ch in shapes]
    cm, cv, gm, gv = [], [], [], []
    for layer in acts:  # per-channel statistics pooled over images and positions, by plain formulas
        per_class = [a.double().transpose(0, 1).flatten(1) for a in layer]  # channels x values
        everything = torch.cat(per_class, 1)
        cm.append(torch.stack([v.mean(1) for v in per_class]))
        cv.append(torch.stack([v.var(1, unbiased=False) for v in per_class]))
        gm.append(everything.mean(1))
        gv.append(everything.var(1, unbiased=False))
    stats = BNStats(["a", "b"], ["0", "1", "2"], torch.tensor(counts, dtype=torch.float64), cm, cv, gm, gv)
    got = bn_class_gaps(stats)
    for layer in range(2):
        for c in range(3):
            gap = math.sqrt(sum(float((cm[layer][c, k] - gm[layer][k]) ** 2 / gv[layer][k])
                                for k in range(shapes[layer])) / shapes[layer])
            ratio = sum(float(cv[layer][c, k] / gv[layer][k]) for k in range(shapes[layer])) / shapes[layer]
            assert float(got["mean_gap"][layer, c]) == pytest.approx(gap, rel=1e-10)
            assert float(got["var_ratio"][layer, c]) == pytest.approx(ratio, rel=1e-10)
        # law of total variance: within-class share + between-class share = 1, channel by channel
        within = sum(sum(counts[c] * float(cv[layer][c, k]) for c in range(3)) / sum(counts) / float(gv[layer][k])
                     for k in range(shapes[layer])) / shapes[layer]
        assert float(got["between_fraction"][layer]) == pytest.approx(1 - within, rel=1e-9)


def test_streamed_within_class_cosine_equals_the_mean_over_every_pair():
    from dsutil.analysis import streamed_within_class_cosine, within_class_cosine

    gen = torch.Generator().manual_seed(0)
    features = torch.randn(97, 12, generator=gen) + torch.randn(1, 12, generator=gen)  # correlated: cosines > 0
    labels = torch.randint(0, 5, (97,), generator=gen)
    labels[-1] = 7  # a class of one image: no pair, skipped
    z = torch.nn.functional.normalize(features.double(), dim=1)
    pair_means = []  # the reference: every distinct pair of each class, one at a time
    for c in sorted(set(labels.tolist())):
        idx = torch.nonzero(labels == c).flatten().tolist()
        pairs = [float(z[i] @ z[j]) for a, i in enumerate(idx) for j in idx[a + 1:]]
        if pairs:
            pair_means.append(sum(pairs) / len(pairs))
    want = sum(pair_means) / len(pair_means)
    assert abs(within_class_cosine(features, labels) - want) < 1e-12
    batches = [(features[a:a + 10], labels[a:a + 10]) for a in range(0, 97, 10)]  # any split gives the same
    assert abs(streamed_within_class_cosine(batches) - want) < 1e-12


def test_one_image_per_class_has_no_within_class_cosine_and_the_summary_says_why(tmp_path):
    """IPC 1 (the imagenet1k rehearsal's set): no pair within a class, so the cosine is None, and the table and the
    figure say so instead of failing after every stage has run."""
    from dsutil.analysis import streamed_within_class_cosine, within_class_cosine
    from dsutil.plots import cosine_bars
    from dsutil.runner import summary_table

    feats = torch.randn(4, 8)
    assert within_class_cosine(feats, torch.arange(4)) is None
    assert streamed_within_class_cosine([(feats[:2], torch.tensor([0, 1])), (feats[2:], torch.tensor([0, 1]))]) is not None
    student = {"prune_ratio": 0.0, "test_top1": 0.5, "test_top1_std": None}
    summary = {"teacher": {"arch": "convnet", "test_top1": 0.9}, "real_within_class_cosine": 0.4, "seeds": [0],
               "methods": {"sre2l": {"within_class_cosine": None, "label_bytes_full": 10, "students": [student]},
                           "lpld": {"within_class_cosine": 0.3, "label_bytes_full": 10, "students": [student]}}}
    table = summary_table(summary)
    assert "sre2l" in table and "n/a" in table and "one image per class" in table and "0.300" in table
    fig = cosine_bars({n: m["within_class_cosine"] for n, m in summary["methods"].items()}, 0.4, "IPC 1")
    assert any("n/a" in t.get_text() for t in fig.axes[0].texts)
