"""gdw.data: noise / imbalance protocols, meta sets, splits, batching, real Fashion-MNIST."""

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from gdw.data import (apply_imbalance, apply_noise, crop_flip, epoch_plan, load_split,
                      longtail_counts, parse_imbalance, parse_noise, prepare, step_counts,
                      transition_matrix)
from gdw.data import builtin
from gdw.errors import UserError

from conftest import one_line_error


def counts_matrix(true, noisy, C):
    """Independent realised transition: explicit count loop over (i, j) pairs."""
    M = np.zeros((C, C))
    for i in range(C):
        row = noisy[true == i]
        for j in range(C):
            M[i, j] = np.sum(row == j) / max(len(row), 1)
    return M


# ------------------------------------------------------------------ noise models

C10 = 10


def expected_T(kind, r, C):
    T = np.zeros((C, C))
    for i in range(C):
        for j in range(C):
            if kind == "uniform":
                T[i, j] = r / C + (1 - r) * (i == j)
            elif kind == "symmetric":
                T[i, j] = 1 - r if i == j else r / (C - 1)
            elif kind == "pair":
                T[i, j] = (1 - r) * (i == j) + r * (j == (i + 1) % C)
    return T


@pytest.mark.parametrize("spec", ["uniform:0.4", "symmetric:0.4", "pair:0.45", "flip:0.3",
                                  "matrix:npy", "matrix:csv", "none"])
def test_realised_transition_close_to_requested_on_50000_labels(spec, tmp_path):
    rng = np.random.default_rng(123)
    true = rng.integers(0, C10, size=50_000)
    if spec.startswith("matrix"):
        M = rng.dirichlet(np.ones(C10) * 0.7, size=C10)
        path = tmp_path / f"T.{spec[7:]}"
        np.save(path, M) if spec.endswith("npy") else np.savetxt(path, M, delimiter=",",
                                                                 fmt="%.17g")
        spec = f"matrix:{path}"
    noisy, T = apply_noise(true, C10, spec, np.random.default_rng(7))
    kind, _, arg = spec.partition(":")
    if kind in ("uniform", "symmetric", "pair"):
        np.testing.assert_allclose(T, expected_T(kind, float(arg), C10), atol=1e-12)
    elif kind == "flip":
        np.testing.assert_allclose(np.diag(T), 0.7)
        off = T - np.diag(np.diag(T))
        assert ((off > 0).sum(axis=1) == 1).all() and np.allclose(off.sum(axis=1), 0.3)
    elif kind == "matrix":
        np.testing.assert_allclose(T, M, atol=1e-12)
    else:
        np.testing.assert_array_equal(noisy, true)
    realised = counts_matrix(true, noisy, C10)
    assert np.abs(realised - T).max() < 0.01
    # and the realised noise rate is what the matrix implies (off-diagonal mass)
    expected_rate = sum(np.mean(true == i) * (1 - T[i, i]) for i in range(C10))
    assert abs(np.mean(noisy != true) - expected_rate) < 0.005


def test_uniform_noise_changes_only_r_times_c_minus_1_over_c():
    true = np.repeat(np.arange(10), 5000)
    noisy, _ = apply_noise(true, 10, "uniform:0.4", np.random.default_rng(0))
    assert abs(np.mean(noisy != true) - 0.36) < 0.001


def test_noise_assignment_is_random_and_seeded():
    true = np.repeat(np.arange(4), 1000)
    a, _ = apply_noise(true, 4, "symmetric:0.3", np.random.default_rng(1))
    b, _ = apply_noise(true, 4, "symmetric:0.3", np.random.default_rng(1))
    c, _ = apply_noise(true, 4, "symmetric:0.3", np.random.default_rng(2))
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    flipped = np.flatnonzero(a != true)
    # corrupted examples are spread over each class, not the first 30 % of it
    assert 0.2 < np.mean((flipped % 1000) >= 500) / 1 < 0.8


def test_flip_targets_drawn_per_class_from_rng():
    seen = set()
    for s in range(20):
        T = transition_matrix("flip:0.2", 5, np.random.default_rng(s))
        targets = tuple(int(np.argmax(T[i] - np.eye(5)[i])) for i in range(5))
        assert all(t != i for i, t in enumerate(targets))
        seen.add(targets)
    assert len(seen) > 5


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=1, max_size=300), st.floats(0, 1),
       st.sampled_from(["uniform", "symmetric", "pair", "flip"]), st.integers(0, 2**32 - 1))
def test_realised_within_one_example_per_class(labels, rate, kind, seed):
    true = np.array(labels)
    noisy, T = apply_noise(true, 5, f"{kind}:{rate}", np.random.default_rng(seed))
    assert noisy.shape == true.shape and noisy.min() >= 0 and noisy.max() < 5
    n_c = np.bincount(true, minlength=5)
    realised = counts_matrix(true, noisy, 5)
    for i in np.flatnonzero(n_c):
        assert np.abs(realised[i] - T[i]).max() <= 1 / n_c[i] + 1e-9
        assert (noisy[true == i][T[i][noisy[true == i]] == 0]).size == 0  # impossible moves


@pytest.mark.parametrize("spec,needle", [
    ("uniform:1.5", "[0, 1]"), ("symmetric:-0.1", "[0, 1]"), ("pair:abc", "number"),
    ("uniform", "needs a rate"), ("gaussian:0.2", "unknown noise kind"), ("flip:nan", "finite"),
    ("matrix:/no/such/file.npy", "not found"), ("cifar10n:", "label key"),
    ("none:3", "no argument"),
])
def test_bad_noise_specs(spec, needle):
    with pytest.raises(UserError) as e:
        parse_noise(spec)
    one_line_error(e, needle)


def test_bad_matrices(tmp_path):
    np.save(tmp_path / "rows.npy", np.array([[0.5, 0.4], [0.0, 1.0]]))
    np.save(tmp_path / "neg.npy", np.array([[1.2, -0.2], [0.0, 1.0]]))
    np.save(tmp_path / "rect.npy", np.ones((2, 3)) / 3)
    np.savetxt(tmp_path / "ok3.csv", np.eye(3), delimiter=",")
    (tmp_path / "text.csv").write_text("a,b\n1,0\n")
    for name, needle in [("rows.npy", "row 0 sums to 0.9"), ("neg.npy", "negative"),
                         ("rect.npy", "square"), ("text.csv", "cannot read")]:
        with pytest.raises(UserError) as e:
            parse_noise(f"matrix:{tmp_path / name}")
        one_line_error(e, needle, name)
    parse_noise(f"matrix:{tmp_path / 'ok3.csv'}")  # fine without a class count
    with pytest.raises(UserError) as e:
        parse_noise(f"matrix:{tmp_path / 'ok3.csv'}", num_classes=10)
    one_line_error(e, "3x3", "10 classes")
    with pytest.raises(UserError) as e:  # wrong size detected once the dataset is known
        prepare("digits", noise=f"matrix:{tmp_path / 'ok3.csv'}", meta_per_class=0)
    one_line_error(e, "10 classes")


def test_labels_out_of_range_or_not_integers():
    rng = np.random.default_rng(0)
    with pytest.raises(UserError) as e:
        apply_noise(np.array([0, 1, 10]), 10, "uniform:0.1", rng)
    one_line_error(e, "out of range", "10")
    with pytest.raises(UserError) as e:
        apply_noise(np.array([0.5, 1.0]), 10, "uniform:0.1", rng)
    one_line_error(e, "integers")


# ------------------------------------------------------------------ imbalance

def test_longtail_counts_follow_formula():
    # exact cases: RHO**(1/(C-1)) is a whole ratio
    np.testing.assert_array_equal(longtail_counts(1600, 5, 16), [1600, 800, 400, 200, 100])
    np.testing.assert_array_equal(longtail_counts(1000, 3, 100), [1000, 100, 10])
    np.testing.assert_array_equal(longtail_counts(70, 4, 1), [70] * 4)
    got = longtail_counts(5000, 10, 100)
    ref = [math.floor(5000 * 100 ** (-c / 9) + 0.5) for c in range(10)]
    np.testing.assert_array_equal(got, ref)
    assert got[0] == 5000 and got[-1] == 50 and all(np.diff(got) < 0)
    np.testing.assert_array_equal(step_counts(500, 10, 10), [500] * 5 + [50] * 5)
    np.testing.assert_array_equal(step_counts(90, 5, 3), [90, 90, 90, 30, 30])


@pytest.mark.parametrize("spec,needle", [("longtail:0.5", ">= 1"), ("step:x", "number"),
                                         ("zipf:10", "unknown imbalance"), ("longtail", "ratio")])
def test_bad_imbalance_specs(spec, needle):
    with pytest.raises(UserError) as e:
        parse_imbalance(spec)
    one_line_error(e, needle)


def test_apply_imbalance_keeps_formula_counts_randomly():
    y = np.repeat(np.arange(5), [1700, 1650, 1600, 1800, 1620])  # n_max = smallest = 1600
    keep = apply_imbalance(y, 5, "longtail:16", np.random.default_rng(0))
    np.testing.assert_array_equal(np.bincount(y[keep]), [1600, 800, 400, 200, 100])
    assert len(np.unique(keep)) == len(keep)
    other = apply_imbalance(y, 5, "longtail:16", np.random.default_rng(1))
    assert not np.array_equal(keep, other)


# ------------------------------------------------------------------ prepare on a small npz

def write_npz(path, n_per_class=60, C=4, shape=(3, 8, 8), seed=0, **extra):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(C), n_per_class)
    x = rng.integers(0, 256, size=(len(y), *shape), dtype=np.uint8)
    yt = np.arange(C).repeat(5)
    xt = rng.integers(0, 256, size=(len(yt), *shape), dtype=np.uint8)
    np.savez(path, x_train=x, y_train=y, x_test=xt, y_test=yt, **extra)
    return x, y


def test_prepare_meta_disjoint_clean_balanced_and_protocol_order(tmp_path):
    x, y = write_npz(tmp_path / "d.npz", n_per_class=60, C=4)
    d = prepare(f"npz:{tmp_path / 'd.npz'}", noise="symmetric:0.5", imbalance="longtail:8",
                meta_per_class=10, seed=3)
    tr, me = d.train, d.meta
    ti, mi = tr.index.numpy(), me.index.numpy()
    assert set(ti).isdisjoint(mi) and len(set(ti)) == len(ti)
    np.testing.assert_array_equal(me.labels.numpy(), y[mi])  # clean
    np.testing.assert_array_equal(np.bincount(me.labels.numpy()), [10] * 4)  # balanced
    np.testing.assert_array_equal(tr.true_labels.numpy(), y[ti])
    # imbalance by true class after meta removal: 50 left per class, RHO 8 over 3 steps -> /2
    np.testing.assert_array_equal(np.bincount(y[ti], minlength=4), [50, 25, 13, 6])
    rate = np.mean(tr.labels.numpy() != y[ti])
    assert d.record["realised_noise_rate"] == pytest.approx(rate)
    assert d.record["counts"]["train_true"] == [50, 25, 13, 6]
    assert d.record["counts"]["train_noisy"] == np.bincount(tr.labels.numpy(), minlength=4).tolist()
    assert (d.record["n_train"], d.record["n_meta"], d.record["n_test"]) == (94, 40, 20)
    np.testing.assert_allclose(d.record["realised_transition"],
                               counts_matrix(y[ti], tr.labels.numpy(), 4))
    json.dumps(d.record)
    assert d.input_shape == (3, 8, 8) and d.num_classes == 4 and d.classes == list("0123")


def test_same_seed_same_split_different_seed_different(tmp_path):
    write_npz(tmp_path / "d.npz")
    spec = dict(noise="uniform:0.4", imbalance="step:2", meta_per_class=5)
    a = prepare(str(tmp_path / "d.npz"), seed=1, **spec)
    b = prepare(str(tmp_path / "d.npz"), seed=1, **spec)
    c = prepare(str(tmp_path / "d.npz"), seed=2, **spec)
    for s in ("index", "labels"):
        assert torch.equal(getattr(a.train, s), getattr(b.train, s))
        assert torch.equal(getattr(a.meta, s), getattr(b.meta, s))
    assert not torch.equal(a.meta.index, c.meta.index)
    assert not torch.equal(a.train.index, c.train.index) or \
        not torch.equal(a.train.labels, c.train.labels)
    assert a.record == b.record
    p = a.save_split(tmp_path / "split")
    assert p.name == "split.npz"
    z = np.load(p)
    np.testing.assert_array_equal(z["train_index"], a.train.index.numpy())
    np.testing.assert_array_equal(z["train_labels"], a.train.labels.numpy())
    np.testing.assert_array_equal(z["train_true_labels"], a.train.true_labels.numpy())
    np.testing.assert_array_equal(z["meta_index"], a.meta.index.numpy())
    assert int(z["test_size"]) == 20
    assert load_split(p)["record"] == a.record


def test_meta_needs_enough_examples_and_zero_means_none(tmp_path):
    write_npz(tmp_path / "d.npz", n_per_class=8)
    with pytest.raises(UserError) as e:
        prepare(f"npz:{tmp_path / 'd.npz'}", meta_per_class=8)
    one_line_error(e, "class 0", "has 8 examples", "needs 8 per class")
    d = prepare(f"npz:{tmp_path / 'd.npz'}", meta_per_class=7)
    assert len(d.train) == 4 and len(d.meta) == 28
    d = prepare(f"npz:{tmp_path / 'd.npz'}", meta_per_class=0)
    assert d.meta is None and len(d.train) == 32 and d.record["n_meta"] == 0
    with pytest.raises(UserError) as e:
        prepare(f"npz:{tmp_path / 'd.npz'}", meta_per_class=-1)
    one_line_error(e, "meta_per_class")


def test_digits_default_and_unknown_dataset():
    d = prepare("digits", noise="pair:0.2", seed=0)
    assert d.input_shape == (1, 8, 8) and d.num_classes == 10
    # default meta set: 100 per class capped at a tenth of the smallest class (13 here)
    smallest = min(d.record["counts"]["train_true"]) + 13
    assert len(d.train) + len(d.meta) + len(d.test) == 1797 and len(d.meta) == 10 * (smallest // 10) == 130
    assert abs(len(d.test) - 0.2 * 1797) <= 10
    x, _, _ = next(d.test.batches(len(d.test), shuffle=False))
    assert x.shape == (len(d.test), 1, 8, 8) and x.dtype == torch.float32
    with pytest.raises(UserError) as e:
        prepare("imagenet-21k")
    one_line_error(e, "unknown dataset", "imagenet-21k")
    for kwargs, needle in [(dict(seed=-1), "seed"), (dict(seed="a"), "seed"),
                           (dict(test_fraction=1.0), "test_fraction"),
                           (dict(test_fraction="x"), "test_fraction")]:
        with pytest.raises(UserError) as e:
            prepare("digits", **kwargs)
        one_line_error(e, needle)


# ------------------------------------------------------------------ batching

def test_crop_flip_matches_hand_computed():
    x = torch.arange(2 * 3 * 6 * 7, dtype=torch.float32).reshape(2, 3, 6, 7)
    top, left = torch.tensor([0, 2]), torch.tensor([3, 1])
    flip = torch.tensor([True, False])
    out = crop_flip(x, top, left, flip, (4, 4))
    manual0 = x[0, :, 0:4, 3:7].numpy()[:, :, ::-1]
    manual1 = x[1, :, 2:6, 1:5].numpy()
    np.testing.assert_array_equal(out[0].numpy(), manual0)
    np.testing.assert_array_equal(out[1].numpy(), manual1)


def _cifar_like_npz(tmp_path, n=37):
    rng = np.random.default_rng(5)
    x = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
    y = np.arange(n) % 3
    np.savez(tmp_path / "c.npz", x_train=x, y_train=y, x_test=x[:6], y_test=y[:6])
    return x, y


def test_augmented_batches_equal_hand_computed_pipeline(tmp_path):
    x, y = _cifar_like_npz(tmp_path)
    d = prepare(f"npz:{tmp_path / 'c.npz'}", meta_per_class=0)
    assert d.train.augment and not d.test.augment  # CIFAR-style default
    xf = x.astype(np.float64) / 255
    mean, std = xf.mean(axis=(0, 2, 3)), xf.std(axis=(0, 2, 3))
    b, seed, epoch = 8, 11, 4
    order, (top, left, flip) = epoch_plan(len(x), shuffle=True, seed=seed, epoch=epoch,
                                          jitter=(8, 8))
    assert set(top.tolist()) <= set(range(9)) and flip.any() and (~flip).any()
    got = list(d.train.batches(b, seed=seed, epoch=epoch))
    k = 0
    for xb, yb, pos in got:
        for j in range(len(pos)):
            assert int(pos[j]) == int(order[k])
            img = np.pad(xf[int(pos[j])], ((0, 0), (4, 4), (4, 4)))
            t, l = int(top[k]), int(left[k])
            img = img[:, t:t + 32, l:l + 32]
            if flip[k]:
                img = img[:, :, ::-1]
            want = (img - mean[:, None, None]) / std[:, None, None]
            np.testing.assert_allclose(xb[j].numpy(), want, atol=2e-5)
            assert int(yb[j]) == y[int(pos[j])]
            k += 1
    assert k == len(x)


def test_batches_deterministic_complete_and_resumable(tmp_path):
    x, y = _cifar_like_npz(tmp_path, n=50)
    d = prepare(f"npz:{tmp_path / 'c.npz'}", noise="uniform:0.5", meta_per_class=0)
    run = lambda **kw: list(d.train.batches(16, seed=3, epoch=2, **kw))  # noqa: E731
    a, b = run(), run()
    assert len(a) == 4 and [len(t[1]) for t in a] == [16, 16, 16, 2]
    for (xa, ya, pa), (xb, yb, pb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and torch.equal(pa, pb)
    pos = torch.cat([t[2] for t in a])
    assert sorted(pos.tolist()) == list(range(50))  # each example exactly once per epoch
    assert torch.equal(torch.cat([t[1] for t in a]), d.train.labels[pos])
    resumed = run(start=2)
    for (xa, ya, pa), (xr, yr, pr) in zip(a[2:], resumed):
        assert torch.equal(xa, xr) and torch.equal(pa, pr)
    other = list(d.train.batches(16, seed=3, epoch=3))
    assert not torch.equal(pos, torch.cat([t[2] for t in other]))
    dropped = list(d.train.batches(16, seed=3, epoch=2, drop_last=True))
    assert [len(t[1]) for t in dropped] == [16, 16, 16]
    # no augmentation, no shuffle: plain normalised images in order
    xf = x.astype(np.float64) / 255
    mean, std = xf.mean(axis=(0, 2, 3)), xf.std(axis=(0, 2, 3))
    xb, _, pos = next(d.test.batches(6, shuffle=False))
    assert pos.tolist() == list(range(6))
    np.testing.assert_allclose(xb.numpy(), (xf[:6] - mean[:, None, None]) / std[:, None, None],
                               atol=2e-5)
    with pytest.raises(UserError) as e:
        next(d.train.batches(0))
    one_line_error(e, "batch_size")


def test_a_last_batch_of_one_joins_the_batch_before():
    """A BatchNorm layer cannot normalise one example in training mode, so an
    epoch of 16k + 1 examples has k batches, the last of 17; every example
    still appears once, and a resumed epoch and the batch count agree."""
    import torch.nn as nn

    from gdw.data.batches import batch_plan, num_batches

    sizes = lambda n, **kw: [len(c) for c in batch_plan(n, 16, shuffle=True, seed=1, epoch=0, **kw)[1]]  # noqa: E731
    assert sizes(49) == [16, 16, 17] and sizes(50) == [16, 16, 16, 2] and sizes(17) == [17] and sizes(1) == [1]
    assert sizes(49, start=2) == [17] and sizes(49, drop_last=True) == [16, 16, 16]
    offsets, chunks, _ = batch_plan(49, 16, shuffle=True, seed=1, epoch=0)
    assert offsets == [0, 16, 32] and sorted(np.concatenate(chunks).tolist()) == list(range(49))
    assert [num_batches(n, 16) for n in (0, 1, 16, 17, 18, 33, 49, 50)] == [0, 1, 1, 1, 2, 2, 3, 4]
    # what the merge prevents
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        nn.BatchNorm1d(3).train()(torch.zeros(1, 3))


def test_tabular_batches_and_augment_refused(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(3, 2, size=(40, 5)).astype(np.float32)
    y = np.arange(40) % 2
    np.savez(tmp_path / "t.npz", x_train=x, y_train=y, x_test=x[:4], y_test=y[:4])
    d = prepare(f"npz:{tmp_path / 't.npz'}", meta_per_class=3)
    assert d.input_shape == (5,)
    xb, yb, pos = next(d.train.batches(100, shuffle=False))
    rows = x[d.train.index.numpy()]
    want = (rows - x.mean(0)) / x.std(0)
    np.testing.assert_allclose(xb.numpy(), want, atol=1e-4)
    with pytest.raises(UserError) as e:
        next(d.train.batches(4, augment=True))
    one_line_error(e, "image")


# ------------------------------------------------------------------ real Fashion-MNIST

def test_real_fashion_mnist_from_debian_package():
    folder = Path("/usr/share/datasets/fashion-mnist")
    if not (folder / "train-images-idx3-ubyte.gz").is_file():
        if os.environ.get("CI") == "true":
            pytest.fail(f"Fashion-MNIST files missing in {folder} (install dataset-fashion-mnist)")
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    src = builtin.read_idx_dataset("fashion-mnist")
    assert len(src.y_train) == 60_000 and len(src.y_test) == 10_000
    assert src.x_train.shape == (1, 28, 28) and len(src.classes) == 10
    assert np.bincount(src.y_train).tolist() == [6000] * 10
    d = prepare("fashion-mnist", noise="flip:0.2", meta_per_class=100, seed=0)
    assert (len(d.train), len(d.meta), len(d.test)) == (59_000, 1000, 10_000)
    assert d.input_shape == (1, 28, 28) and d.classes[0] == "T-shirt/top"
    assert abs(d.record["realised_noise_rate"] - 0.2) < 0.001
    xb, yb, _ = next(d.test.batches(10_000, shuffle=False))
    assert xb.shape == (10_000, 1, 28, 28)
    assert abs(float(xb.mean())) < 0.05  # training mean/std are close to the test ones


def test_shards_concatenate_to_the_single_process_batches():
    """Data-parallel shards: rank shares in rank order are the global batch."""
    d = prepare("digits", meta_per_class=10, seed=0)
    for world in (2, 3):
        full = list(d.train.batches(64, seed=1, epoch=2))
        shards = [list(d.train.batches(64, seed=1, epoch=2, shard=(r, world))) for r in range(world)]
        assert all(len(s) == len(full) for s in shards)
        for k, (x, y, pos) in enumerate(full):
            assert torch.equal(x, torch.cat([s[k][0] for s in shards]))
            assert torch.equal(pos, torch.cat([s[k][2] for s in shards]))
