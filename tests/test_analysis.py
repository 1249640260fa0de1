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
