"""gdw.data readers (official on-disk formats written here) and downloads from a local server."""

import gzip
import hashlib
import http.server
import io
import json
import pickle
import struct
import tarfile
import threading
import zipfile

import numpy as np
import pytest
import torch

from gdw.data import builtin, download, fetch, prepare, read_idx, safe_extract, sources
from gdw.errors import UserError

from conftest import one_line_error


@pytest.fixture(autouse=True)
def _no_system_datasets(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "SYSTEM_DIR", tmp_path / "no-system-datasets")


# ------------------------------------------------------------------ IDX (MNIST format)

def idx_bytes(a: np.ndarray) -> bytes:
    """IDX by the spec: 0, 0, type 0x08 (ubyte), ndim, big-endian uint32 dims, data."""
    return bytes([0, 0, 8, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape) + a.tobytes()


def write_idx_dataset(folder, n_train=30, n_test=10, compress=True, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) % 10).astype(np.uint8),
    }
    for name, a in arrays.items():
        if compress:
            with gzip.open(folder / (name + ".gz"), "wb") as f:
                f.write(idx_bytes(a))
        else:
            (folder / name).write_bytes(idx_bytes(a))
    return arrays


@pytest.mark.parametrize("compress", [True, False])
def test_idx_round_trip(tmp_path, compress):
    arrays = write_idx_dataset(tmp_path / "mnist", compress=compress)
    src = builtin.read_idx_dataset("mnist", data_root=tmp_path)
    np.testing.assert_array_equal(src.x_train.x[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(src.y_test, arrays["t10k-labels-idx1-ubyte"])
    d = prepare("mnist", data_root=tmp_path, meta_per_class=1)
    assert (len(d.train), len(d.meta), len(d.test)) == (20, 10, 10)
    assert d.input_shape == (1, 28, 28) and not d.train.augment
    assert d.record["files"][0].startswith(str(tmp_path / "mnist"))


def test_idx_truncated_missing_and_bad_magic(tmp_path):
    write_idx_dataset(tmp_path / "fashion-mnist")
    f = tmp_path / "fashion-mnist" / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(f.read_bytes())
    with gzip.open(f, "wb") as g:
        g.write(raw[:-100])  # valid gzip, truncated IDX payload
    with pytest.raises(UserError) as e:
        prepare("fashion-mnist", data_root=tmp_path)
    one_line_error(e, "truncated", str(f))
    f.write_bytes(f.read_bytes()[:50])  # truncated gzip stream
    with pytest.raises(UserError) as e:
        read_idx(f)
    one_line_error(e, str(f))
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01abcd")
    with pytest.raises(UserError) as e:
        read_idx(tmp_path / "bad")
    one_line_error(e, "magic")
    (tmp_path / "fashion-mnist" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(UserError) as e:
        builtin.read_idx_dataset("fashion-mnist", data_root=tmp_path)
    one_line_error(e, "missing", "t10k-labels-idx1-ubyte")
    with pytest.raises(UserError) as e:
        prepare("mnist", data_root=tmp_path / "empty")
    one_line_error(e, "not found", "download=True")


def test_idx_labels_out_of_range(tmp_path):
    arrays = write_idx_dataset(tmp_path / "mnist", compress=False)
    labels = arrays["train-labels-idx1-ubyte"].copy()
    labels[3] = 12
    (tmp_path / "mnist" / "train-labels-idx1-ubyte").write_bytes(idx_bytes(labels))
    with pytest.raises(UserError) as e:
        prepare("mnist", data_root=tmp_path)
    one_line_error(e, "out of range", "12")


# ------------------------------------------------------------------ CIFAR pickles

def write_cifar(root, hundred=False, per_batch=12, n_test=10, seed=0):
    """Python-2-style pickles (bytes keys, protocol 2) laid out as in the official archives."""
    rng = np.random.default_rng(seed)
    C = 100 if hundred else 10
    base = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    base.mkdir(parents=True, exist_ok=True)
    key = b"fine_labels" if hundred else b"labels"
    files = ["train"] if hundred else [f"data_batch_{i}" for i in range(1, 6)]
    n_train = per_batch * (10 if hundred else 1)
    xs, ys = [], []
    for f in files + ["test" if hundred else "test_batch"]:
        n = n_test if f.startswith("test") else n_train
        x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, C, n)]
        if not f.startswith("test"):
            y[:C] = list(range(C))[:n] if n >= C else y[:n]
            xs.append(x), ys.append(y)
        d = {b"batch_label": f.encode(), key: y, b"data": x,
             b"filenames": [b"img%d.png" % i for i in range(n)]}
        if hundred:
            d[b"coarse_labels"] = [v // 5 for v in y]
        (base / f).write_bytes(pickle.dumps(d, protocol=2))
        if f.startswith("test"):
            test = (x, y)
    names = [f"class{i}".encode() for i in range(C)]
    meta = {b"fine_label_names": names, b"coarse_label_names": names[:20]} if hundred else \
        {b"label_names": names, b"num_cases_per_batch": per_batch, b"num_vis": 3072}
    (base / ("meta" if hundred else "batches.meta")).write_bytes(pickle.dumps(meta, protocol=2))
    return np.concatenate(xs), np.concatenate(ys), test


def test_cifar10_round_trip(tmp_path):
    x, y, (xt, yt) = write_cifar(tmp_path / "data", per_batch=12)
    d = prepare("cifar10", data_root=tmp_path / "data", meta_per_class=1, seed=0)
    assert d.classes == [f"class{i}" for i in range(10)] and d.input_shape == (3, 32, 32)
    assert len(d.train) + len(d.meta) == 60 and len(d.test) == 10 and d.train.augment
    idx = d.train.index
    np.testing.assert_array_equal(d.train.store.x[idx].numpy(),
                                  x[idx.numpy()].reshape(-1, 3, 32, 32))
    np.testing.assert_array_equal(d.train.true_labels.numpy(), y[idx.numpy()])
    np.testing.assert_array_equal(d.test.labels.numpy(), yt)
    xb, _, _ = next(d.test.batches(10, shuffle=False))
    want = (xt.reshape(-1, 3, 32, 32) / 255 - np.array([0.4914, 0.4822, 0.4465])[:, None, None]) \
        / np.array([0.2470, 0.2435, 0.2616])[:, None, None]
    np.testing.assert_allclose(xb.numpy(), want, atol=1e-5)


def test_cifar100_round_trip_fine_labels(tmp_path):
    x, y, (xt, yt) = write_cifar(tmp_path, hundred=True, per_batch=3)
    src = builtin.read_cifar("cifar100", data_root=tmp_path)
    assert len(src.classes) == 100 and src.classes[7] == "class7"
    np.testing.assert_array_equal(src.y_train, y)
    np.testing.assert_array_equal(src.x_train.x.numpy(), x.reshape(-1, 3, 32, 32))
    np.testing.assert_array_equal(src.y_test, yt)
    with pytest.raises(UserError) as e:  # 30 examples cannot give 10 per class
        prepare("cifar100", data_root=tmp_path, meta_per_class=10)
    one_line_error(e, "meta set needs 10 per class")


def test_cifar_missing_truncated_and_hostile_pickles(tmp_path):
    write_cifar(tmp_path)
    base = tmp_path / "cifar-10-batches-py"
    (base / "data_batch_3").unlink()
    with pytest.raises(UserError) as e:
        prepare("cifar10", data_root=tmp_path)
    one_line_error(e, "data_batch_3", "not found")
    good = (base / "data_batch_1").read_bytes()
    (base / "data_batch_3").write_bytes(good[: len(good) // 2])
    with pytest.raises(UserError) as e:
        prepare("cifar10", data_root=tmp_path)
    one_line_error(e, "data_batch_3")

    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    (base / "data_batch_3").write_bytes(pickle.dumps({b"data": Evil()}))
    with pytest.raises(UserError) as e:
        prepare("cifar10", data_root=tmp_path)
    one_line_error(e, "refusing", "print")


# ------------------------------------------------------------------ CIFAR-10N / 100N

def write_cifar_n(path, n, C=10, seed=1, torch_format=True):
    rng = np.random.default_rng(seed)
    d = {"clean_label": rng.integers(0, C, n), "worse_label": rng.integers(0, C, n),
         "aggre_label": rng.integers(0, C, n), "random_label1": rng.integers(0, C, n),
         "noisy_label": rng.integers(0, C, n)}
    if torch_format:
        torch.save(d, path)
    else:
        path.write_bytes(pickle.dumps(d, protocol=2))
    return d


def test_cifar10n_file_pickled_by_numpy_1(tmp_path):
    """The published file predates numpy 2: its pickle names numpy.core.multiarray."""
    _, y, _ = write_cifar(tmp_path)
    labels = write_cifar_n(tmp_path / "new.pt", len(y))
    with zipfile.ZipFile(tmp_path / "new.pt") as zin, \
            zipfile.ZipFile(tmp_path / "CIFAR-10_human.pt", "w") as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith("data.pkl"):
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
                assert b"numpy.core.multiarray" in data
            zout.writestr(info, data)
    d = prepare("cifar10", noise="cifar10n:aggre", data_root=tmp_path, meta_per_class=0)
    np.testing.assert_array_equal(d.train.labels.numpy(), labels["aggre_label"])


@pytest.mark.parametrize("spec_key,file_key", [("worse", "worse_label"),
                                               ("aggre_label", "aggre_label"),
                                               ("random1", "random_label1")])
def test_cifar10n_labels_replace_training_labels(tmp_path, spec_key, file_key):
    x, y, _ = write_cifar(tmp_path)
    labels = write_cifar_n(tmp_path / "CIFAR-10_human.pt", len(y))
    d = prepare("cifar10", noise=f"cifar10n:{spec_key}", data_root=tmp_path, meta_per_class=1)
    idx = d.train.index.numpy()
    np.testing.assert_array_equal(d.train.labels.numpy(), labels[file_key][idx])
    np.testing.assert_array_equal(d.train.true_labels.numpy(), y[idx])
    np.testing.assert_array_equal(d.meta.labels.numpy(), y[d.meta.index.numpy()])
    assert d.record["cifar_n_key"] == file_key and d.record["requested_transition"] is None
    json.dumps(d.record)
    assert d.record["realised_noise_rate"] == pytest.approx(np.mean(labels[file_key][idx] != y[idx]))


def test_cifar100n_pickled_file_given_by_path_and_errors(tmp_path):
    _, y, _ = write_cifar(tmp_path, hundred=True, per_batch=3)
    f = tmp_path / "elsewhere" / "labels.pkl"
    f.parent.mkdir()
    labels = write_cifar_n(f, len(y), C=100, torch_format=False)
    d = prepare("cifar100", noise=f"cifar100n:noisy:{f}", data_root=tmp_path, meta_per_class=0)
    np.testing.assert_array_equal(d.train.labels.numpy(), labels["noisy_label"])
    with pytest.raises(UserError) as e:
        prepare("cifar100", noise=f"cifar100n:best:{f}", data_root=tmp_path, meta_per_class=0)
    one_line_error(e, "no label key 'best'", "noisy_label")
    with pytest.raises(UserError) as e:
        prepare("cifar100", noise="cifar100n:noisy", data_root=tmp_path, meta_per_class=0)
    one_line_error(e, "CIFAR-100_human.pt", "not found")
    with pytest.raises(UserError) as e:
        prepare("digits", noise=f"cifar10n:worse:{f}")
    one_line_error(e, "cifar10")
    write_cifar_n(f, len(y) - 1, C=100, torch_format=False)
    with pytest.raises(UserError) as e:
        prepare("cifar100", noise=f"cifar100n:noisy:{f}", data_root=tmp_path, meta_per_class=0)
    one_line_error(e, "has 29 labels", "30")


# ------------------------------------------------------------------ Clothing1M

def make_image(path, size, color, mode="RGB"):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)


def write_clothing(root):
    """3 categories; 12 noisy-train keys (5 also in the clean kv), clean train/val/test."""
    ann = root / "annotations"
    ann.mkdir(parents=True)
    keys = {k: f"images/{k % 10}/{k:02d}/{k}.jpg" for k in range(30)}
    colors = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]
    for k, p in keys.items():
        make_image(root / p, (40 + k, 30), colors[k % 3])
    noisy_train = list(range(12))
    clean_train, clean_val, clean_test = list(range(9, 18)), list(range(18, 24)), list(range(24, 30))
    noisy_kv = {k: (k + 1) % 3 for k in noisy_train}
    clean_kv = {k: k % 3 for k in [0, 1, 2, 3, 4] + clean_train + clean_val + clean_test}
    (ann / "noisy_label_kv.txt").write_text("".join(f"{keys[k]} {v}\n" for k, v in noisy_kv.items()))
    (ann / "clean_label_kv.txt").write_text("".join(f"{keys[k]} {v}\n" for k, v in clean_kv.items()))
    for name, ks in [("noisy_train", noisy_train), ("clean_train", clean_train),
                     ("clean_val", clean_val), ("clean_test", clean_test)]:
        (ann / f"{name}_key_list.txt").write_text("".join(keys[k] + "\n" for k in ks))
    (ann / "category_names_eng.txt").write_text("Red\nGreen\nBlue\n")
    return keys, noisy_kv, clean_kv


def test_clothing1m_lists_and_streamed_images(tmp_path):
    keys, noisy_kv, clean_kv = write_clothing(tmp_path / "c1m")
    d = prepare(f"clothing1m:{tmp_path / 'c1m'}", image_size=14)
    assert d.classes == ["Red", "Green", "Blue"] and d.input_shape == (3, 14, 14)
    assert d.record["meta_source"] == "provided" and len(d.meta) == 6 and len(d.test) == 6
    # train = noisy keys 0..11 (none of them in clean val) with noisy labels
    np.testing.assert_array_equal(d.train.index.numpy(), np.arange(12))
    np.testing.assert_array_equal(d.train.labels.numpy(), [noisy_kv[k] for k in range(12)])
    np.testing.assert_array_equal(d.train.true_labels.numpy(),
                                  [clean_kv.get(k, -1) for k in range(12)])
    assert d.record["n_train_true_unknown"] == 4  # keys 5..8 are not in the clean kv
    json.dumps(d.record)
    batches = list(d.train.batches(5, seed=0))
    assert [tuple(b[0].shape) for b in batches] == [(5, 3, 14, 14)] * 2 + [(2, 3, 14, 14)]
    xt, yt, _ = next(d.test.batches(6, shuffle=False))
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    pixel = xt[:, :, 7, 7] * std + mean  # solid colours survive resize and crop
    colors = torch.tensor([(200, 30, 30), (30, 200, 30), (30, 30, 200)]) / 255
    np.testing.assert_allclose(pixel.numpy(), colors[yt].numpy(), atol=2 / 255)
    # a balanced meta set drawn from the clean train keys is removed from the train set
    d2 = prepare(f"clothing1m:{tmp_path / 'c1m'}", image_size=14, meta_per_class=2, seed=1)
    meta_keys = {keys[9 + i] for i in d2.meta.index.tolist()}
    train_keys = {keys[i] for i in d2.train.index.tolist()}
    assert len(d2.meta) == 6 and not meta_keys & train_keys
    assert len(d2.train) == 12 - len(meta_keys & {keys[k] for k in range(12)})
    with pytest.raises(UserError) as e:
        prepare(f"clothing1m:{tmp_path / 'c1m'}", noise="uniform:0.2")
    one_line_error(e, "already noisy")


def test_clothing1m_missing_list_and_image(tmp_path):
    keys, _, _ = write_clothing(tmp_path / "c1m")
    (tmp_path / "c1m" / keys[25]).unlink()
    d = prepare(f"clothing1m:{tmp_path / 'c1m'}", image_size=8)
    with pytest.raises(UserError) as e:
        list(d.test.batches(6, shuffle=False))
    one_line_error(e, "cannot read image", f"{keys[25]}")
    with pytest.raises(UserError) as e:  # most true labels unknown: cannot imbalance by class
        prepare(f"clothing1m:{tmp_path / 'c1m'}", imbalance="longtail:2")
    one_line_error(e, "needs the true label", "unknown")
    kv = tmp_path / "c1m" / "annotations" / "noisy_label_kv.txt"
    kv.write_text(kv.read_text() + "images/x.jpg three\n")
    with pytest.raises(UserError) as e:
        prepare(f"clothing1m:{tmp_path / 'c1m'}")
    one_line_error(e, "noisy_label_kv.txt, line 13", "expected 'path label'")
    (tmp_path / "c1m" / "annotations" / "clean_val_key_list.txt").unlink()
    with pytest.raises(UserError) as e:
        prepare(f"clothing1m:{tmp_path / 'c1m'}")
    one_line_error(e, "missing Clothing1M file", "clean_val_key_list.txt")


# ------------------------------------------------------------------ class folders

def write_folder(root, per_class=(5, 4, 6)):
    colors = {}
    for c, (name, n) in enumerate(zip(["zebra", "ant", "moth"], per_class)):
        for i in range(n):
            col = (c * 80 + i, 10 * i, 255 - c * 60)
            ext = ".png" if i % 2 else ".jpg"
            make_image(root / name / f"{i}{ext}", (10 + i, 9), col)
            colors[(name, i)] = col
    return colors


def test_folder_memory_and_streaming_give_same_batches(tmp_path):
    write_folder(tmp_path / "imgs")
    a = prepare(f"folder:{tmp_path / 'imgs'}", image_size=8, meta_per_class=1, seed=2)
    b = prepare(str(tmp_path / "imgs"), image_size=8, meta_per_class=1, seed=2, stream=True)
    assert a.classes == ["ant", "moth", "zebra"] and a.input_shape == (3, 8, 8)
    assert a.record["streamed"] is False and b.record["streamed"] is True
    assert len(a.train) + len(a.meta) + len(a.test) == 15
    for sa, sb in ((a.train, b.train), (a.meta, b.meta), (a.test, b.test)):
        assert torch.equal(sa.index, sb.index) and torch.equal(sa.labels, sb.labels)
        xa, _, pa = next(sa.batches(100, seed=4))
        xb, _, pb = next(sb.batches(100, seed=4))
        assert torch.equal(pa, pb)
        torch.testing.assert_close(xa, xb, atol=0.05, rtol=0)  # stats from a subsample


def test_folder_train_test_layout_and_errors(tmp_path):
    write_folder(tmp_path / "f" / "train")
    write_folder(tmp_path / "f" / "test", per_class=(1, 0, 2))
    d = prepare(f"folder:{tmp_path / 'f'}", meta_per_class=0)
    assert len(d.train) == 15 and len(d.test) == 3 and d.input_shape == (3, 9, 10)
    np.testing.assert_array_equal(d.test.labels.numpy(), [1, 1, 2])
    make_image(tmp_path / "f" / "test" / "wasp" / "0.png", (4, 4), (1, 2, 3))
    with pytest.raises(UserError) as e:
        prepare(f"folder:{tmp_path / 'f'}", meta_per_class=0)
    one_line_error(e, "wasp")
    (tmp_path / "g" / "cls").mkdir(parents=True)
    (tmp_path / "g" / "cls" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(UserError) as e:
        prepare(f"folder:{tmp_path / 'g'}", meta_per_class=0)
    one_line_error(e, "broken.png")
    with pytest.raises(UserError) as e:
        prepare(f"folder:{tmp_path / 'nope'}")
    one_line_error(e, "not found")


# ------------------------------------------------------------------ npz

def test_npz_round_trip_with_noisy_labels_and_user_meta(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (20, 6, 6), dtype=np.uint8)  # N x H x W greyscale
    yt = np.arange(20) % 2
    yn = yt.copy()
    yn[:5] = 1 - yn[:5]
    np.savez(tmp_path / "d.npz", x_train=x, y_train=yn, y_train_true=yt, x_test=x[:4],
             y_test=yt[:4], x_meta=x[:6], y_meta=yt[:6], classes=np.array(["cat", "dog"]))
    d = prepare(f"npz:{tmp_path / 'd.npz'}")
    assert d.classes == ["cat", "dog"] and d.input_shape == (1, 6, 6)
    assert len(d.train) == 20 and len(d.meta) == 6 and d.record["meta_source"] == "provided"
    np.testing.assert_array_equal(d.train.labels.numpy(), yn)
    np.testing.assert_array_equal(d.train.true_labels.numpy(), yt)
    np.testing.assert_array_equal(d.meta.index.numpy(), np.arange(6))
    assert d.record["realised_noise_rate"] == 0.25
    d2 = prepare(f"npz:{tmp_path / 'd.npz'}", meta_per_class=2)  # balanced draw from x_meta
    assert np.bincount(d2.meta.labels.numpy()).tolist() == [2, 2] and len(d2.train) == 20
    with pytest.raises(UserError) as e:
        prepare(f"npz:{tmp_path / 'd.npz'}", noise="pair:0.2")
    one_line_error(e, "already noisy")


@pytest.mark.parametrize("change,needle", [
    (dict(y_train=np.array([0, 1, 2, 5])), "out of range"),
    (dict(y_train=np.array([0.0, 1.5, 1.0, 0.0])), "integers"),
    (dict(y_train=np.array([0, -1, 1, 0])), "out of range"),
    (dict(y_train=np.array([0, 1, 1])), "labels"),
    (dict(x_train=np.array([["a"] * 3] * 4)), "numeric"),
])
def test_npz_bad_inputs(tmp_path, change, needle):
    arrays = dict(x_train=np.zeros((4, 3), np.float32), y_train=np.array([0, 1, 1, 0]),
                  x_test=np.zeros((2, 3), np.float32), y_test=np.array([0, 1]),
                  classes=np.array(["a", "b", "c"]))
    arrays.update(change)
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(UserError) as e:
        prepare(f"npz:{tmp_path / 'bad.npz'}", meta_per_class=0)
    one_line_error(e, needle, "bad.npz")


def test_npz_missing_arrays_and_not_a_zip(tmp_path):
    np.savez(tmp_path / "m.npz", x_train=np.zeros((2, 2)))
    with pytest.raises(UserError) as e:
        prepare(f"npz:{tmp_path / 'm.npz'}")
    one_line_error(e, "lacks arrays", "y_train")
    (tmp_path / "z.npz").write_bytes(b"garbage")
    with pytest.raises(UserError) as e:
        prepare(f"npz:{tmp_path / 'z.npz'}")
    one_line_error(e, "z.npz")


# ------------------------------------------------------------------ CSV

def test_csv_string_and_integer_labels(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 3))
    names = np.array(["setosa", "versicolor", "virginica"])[np.arange(30) % 3]
    lines = ["f1,species,f2,f3"] + [f"{a},{s},{b},{c}" for (a, b, c), s in zip(x, names)]
    (tmp_path / "s.csv").write_text("\n".join(lines) + "\n")
    d = prepare(f"csv:{tmp_path / 's.csv'}", label_column="species", meta_per_class=2,
                test_fraction=0.2)
    assert d.classes == ["setosa", "versicolor", "virginica"] and d.input_shape == (3,)
    assert len(d.test) == 6 and np.bincount(d.test.labels.numpy()).tolist() == [2, 2, 2]
    assert len(d.train) + len(d.meta) == 24
    lines = ["a,b,label"] + [f"{i},{2 * i},{[3, 7, 11][i % 3]}" for i in range(30)]
    (tmp_path / "i.csv").write_text("\n".join(lines))
    d = prepare(f"csv:{tmp_path / 'i.csv'}", meta_per_class=0)
    assert d.classes == ["3", "7", "11"]  # numeric order, not string order
    xb, yb, _ = next(d.train.batches(100, shuffle=False))
    xt, yt, _ = next(d.test.batches(100, shuffle=False))
    np.testing.assert_allclose(xb.numpy().mean(0), 0, atol=1e-5)  # training statistics
    np.testing.assert_allclose(xb.numpy().std(0), 1, atol=1e-4)
    mean, std = d.train.view.mean.numpy(), d.train.view.std.numpy()
    a_train = np.round(xb.numpy() * std + mean)[:, 0].astype(int)  # column a = row number
    a_test = np.round(xt.numpy() * std + mean)[:, 0].astype(int)
    assert sorted(a_train.tolist() + a_test.tolist()) == list(range(30))
    assert sorted(a_test % 3) == [0, 0, 1, 1, 2, 2]  # stratified 20 %
    np.testing.assert_array_equal(yb.numpy(), a_train % 3)
    np.testing.assert_array_equal(yt.numpy(), a_test % 3)


@pytest.mark.parametrize("text,needle", [
    ("a,label\n1,x\noops,y\n3,x\n", "line 3, column 'a': non-numeric value 'oops'"),
    ("a,label\n1,x\n\n,y\n", "line 4"),  # blank lines still count
    ("a,b\n1,2\n", "no column 'label' (columns: ['a', 'b']); if the labels are its last column: --label-column b"),
    ("a,label\n1,x,3\n", "line 2: 3 fields"),
    ("a,label\n1,x\n2,x\n", "has one class, 'x': a classifier needs examples of two or more classes (is --label-column"),
])
def test_csv_bad_inputs(tmp_path, text, needle):
    (tmp_path / "bad.csv").write_text(text)
    with pytest.raises(UserError) as e:
        prepare(f"csv:{tmp_path / 'bad.csv'}", meta_per_class=0)
    one_line_error(e, needle)


# ------------------------------------------------------------------ downloads

class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path.endswith("/truncated.bin"):  # promises 1000 bytes, sends 100
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"x" * 100)
            self.close_connection = True
            return
        super().do_GET()


@pytest.fixture
def server(tmp_path, monkeypatch):
    """A local HTTP server on 127.0.0.1 serving tmp_path/www; stops itself after 60 s."""
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    www = tmp_path / "www"
    www.mkdir()
    handler = lambda *a, **k: _Handler(*a, directory=str(www), **k)  # noqa: E731
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    timer = threading.Timer(60, srv.shutdown)
    timer.daemon = True
    timer.start()
    yield www, f"http://127.0.0.1:{srv.server_address[1]}"
    timer.cancel()
    srv.shutdown()
    srv.server_close()
    thread.join(5)


def test_fetch_verifies_checksum_and_leaves_nothing_on_failure(tmp_path, server):
    www, url = server
    payload = b"hello gdw" * 1000
    (www / "f.bin").write_bytes(payload)
    dest_dir = tmp_path / "dl"
    out = fetch(f"{url}/f.bin", dest_dir / "f.bin", sha256=hashlib.sha256(payload).hexdigest())
    assert out.read_bytes() == payload and sorted(p.name for p in dest_dir.iterdir()) == ["f.bin"]
    with pytest.raises(UserError) as e:
        fetch(f"{url}/f.bin", dest_dir / "g.bin", md5="0" * 32)
    one_line_error(e, "checksum mismatch", "f.bin")
    with pytest.raises(UserError) as e:
        fetch(f"{url}/truncated.bin", dest_dir / "t.bin")
    one_line_error(e, "truncated", "100 of 1000")
    with pytest.raises(UserError) as e:
        fetch(f"{url}/absent.bin", dest_dir / "a.bin", md5="0" * 32)
    one_line_error(e, "cannot download", "404")
    assert sorted(p.name for p in dest_dir.iterdir()) == ["f.bin"]  # no partial/temp files


def _tar_gz(path, folder, arcname):
    with tarfile.open(path, "w:gz") as tar:
        tar.add(folder, arcname=arcname)
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_cifar10_download_from_mirror_and_checksum_mismatch(tmp_path, server, monkeypatch):
    www, url = server
    x, y, _ = write_cifar(tmp_path / "build", per_batch=4)
    (www / "cifar10").mkdir()
    md5 = _tar_gz(www / "cifar10" / "cifar-10-python.tar.gz",
                  tmp_path / "build" / "cifar-10-batches-py", "cifar-10-batches-py")
    cache = tmp_path / "cache" / "cifar10"
    with pytest.raises(UserError) as e:  # the official checksum does not match the test archive
        prepare("cifar10", download=True, mirror=url, meta_per_class=0)
    one_line_error(e, "checksum mismatch", "cifar-10-python.tar.gz")
    assert not cache.exists() or list(cache.iterdir()) == []
    base, files = download.OFFICIAL["cifar10"]
    monkeypatch.setitem(download.OFFICIAL, "cifar10", (base, {"cifar-10-python.tar.gz": md5}))
    monkeypatch.setenv("GDW_MIRROR", url)
    d = prepare("cifar10", download=True, meta_per_class=0)
    assert (cache / "cifar-10-batches-py" / "data_batch_5").is_file()
    np.testing.assert_array_equal(d.train.labels.numpy(), y)
    d = prepare("cifar10", meta_per_class=0)  # found in the cache, no download needed
    assert len(d.train) == 20


def test_mnist_download_from_mirror(tmp_path, server, monkeypatch):
    www, url = server
    arrays = write_idx_dataset(www / "mnist")
    sums = {f.name: hashlib.md5(f.read_bytes()).hexdigest() for f in (www / "mnist").iterdir()}
    monkeypatch.setitem(download.OFFICIAL, "mnist", (download.OFFICIAL["mnist"][0], sums))
    d = prepare("mnist", download=True, mirror=url, meta_per_class=0)
    np.testing.assert_array_equal(d.test.labels.numpy(), arrays["t10k-labels-idx1-ubyte"])
    assert len(list((tmp_path / "cache" / "mnist").iterdir())) == 4


def test_safe_extract_refuses_escaping_members(tmp_path):
    def archive(name, add):
        path = tmp_path / name
        with tarfile.open(path, "w:gz") as tar:
            add(tar)
        return path

    def escaping(tar):
        info = tarfile.TarInfo("../evil.txt")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"evil"))

    def link(tar):
        info = tarfile.TarInfo("innocent")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)

    for name, add, needle in [("a.tgz", escaping, "escapes"), ("b.tgz", link, "plain files")]:
        with pytest.raises(UserError) as e:
            safe_extract(archive(name, add), tmp_path / "out")
        one_line_error(e, needle, name)
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "out").exists()
