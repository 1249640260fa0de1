"""Notebook 05's views: the 2-D toy (dsutil.toy) and its sliders, where the mechanism it teaches holds and each
slider redraws; the small recover on the real teacher, made when its button is pressed."""
import torch

from dsutil import toy


def test_lpld_points_spread_like_real_ones_and_sre2l_points_do_not():
    real_x, real_y, centres = toy.real_points(sigma=0.5)
    real = toy.within_class_spread(real_x, real_y)
    spread = {m: [toy.within_class_spread(*toy.synthesise(real_x, real_y, centres, m, seed=s)) for s in range(5)]
              for m in ("sre2l", "lpld")}
    assert all(abs(v - real) < 0.1 * real for v in spread["lpld"])  # class targets: the points spread as the class
    # global targets over one point per class: nothing spreads a class but the random starts
    assert all(a < b for a, b in zip(*spread.values())) and sum(spread["sre2l"]) < 0.6 * sum(spread["lpld"])
    without = {m: toy.within_class_spread(*toy.synthesise(real_x, real_y, centres, m, r_bn=0.0)) for m in ("sre2l", "lpld")}
    assert max(without.values()) < 0.1 * real  # no BN term: both collapse onto the class centres


def test_the_batches_are_the_methods_groupings():
    """SRe2L's batches hold one point of every class, LPLD's one class each, k points per class in all."""
    real_x, real_y, centres = toy.real_points(n=50)
    for grouping, k in (("sre2l", 2), ("lpld", 2)):
        x, y = toy.synthesise(real_x, real_y, centres, grouping, k=k, steps=0)
        assert sorted(y.tolist()) == sorted([0, 1, 2] * k)
        if grouping == "sre2l":
            assert y.tolist() == [0, 1, 2] * k  # each batch one point of every class
        else:
            assert y.tolist() == [0] * k + [1] * k + [2] * k  # one batch per class
    assert torch.equal(toy.real_points(seed=3)[0], toy.real_points(seed=3)[0])


def test_the_toy_view_redraws_on_each_slider():
    from dsutil.explore import toy_view

    box = toy_view(steps=20)
    sliders, text, _ = box.children
    seen = {text.value}
    for slider, value in zip(sliders.children, (0.0, 1.2, 2.0)):
        slider.value = value
        seen.add(text.value)
    assert len(seen) == 4, seen


def test_the_small_recover_view_recovers_both_groupings_when_pressed_with_the_sliders_values(mnist_run, mnist):
    from dsutil.analysis import within_class_cosine
    from dsutil.config import load_config
    from dsutil.explore import recover_view
    from dsutil.models import penultimate_features
    from dsutil.recover import load_squeezed, recover_in_memory

    teacher, _, stats, _ = load_squeezed(mnist_run)
    cfg = load_config("mnist5k", quick=True)
    box = recover_view(teacher, stats, cfg, mnist, ipc=2, iterations=3, shown=[0, 1])
    (r_bn, steps, seed, button), text, _ = box.children[0].children, box.children[1], box.children[2]
    assert text.value == "press the button to recover"  # nothing is computed before it is asked for
    r_bn.value, steps.value, seed.value = 0.0, 2, 4
    button.click()
    rcfg = cfg.recover_config("lpld")
    x, y = recover_in_memory(teacher, stats, type(rcfg)(**{**rcfg.__dict__, "ipc": 2, "iterations": 2, "r_bn": 0.0,
                                                           "seed": 4}), 10, mnist.shape, mnist.pixel_range(), torch.device("cpu"))
    assert text.value.startswith("r_bn 0.0, 2 iterations, seed 4")
    assert f"LPLD {within_class_cosine(penultimate_features(teacher, x), y):.3f}" in text.value
    first = text.value
    r_bn.value = 1.0
    button.click()
    assert text.value != first and text.value.startswith("r_bn 1.0")
