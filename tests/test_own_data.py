"""gdw.data on the user's own files: a hand-checked meta set (meta=), a clean validation set
(val_per_class), the user's rows / paths / label values in every split, and load_new."""

import csv
import json
import shutil

import numpy as np
import pytest
import torch

from gdw.data import load_new, load_split, prepare, stratified_split
from gdw.errors import UserError

from conftest import one_line_error

NAMES = ["cat", "dog", "emu"]


def all_batches(split, batch_size=7):
    """Model inputs and labels of a split in its own order."""
    xs, ys = zip(*[(x, y) for x, y, _ in split.batches(batch_size, shuffle=False)])
    return torch.cat(xs), torch.cat(ys)


# ------------------------------------------------------------------ files written here

def write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def read_csv_rows(path):
    """The data rows of a CSV file as dicts, read independently with the csv module."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def noisy_csv(path, n_per_class=20, labels=NAMES, seed=0):
    """Shuffled rows; feature ``a`` is unique per row; 1 in 5 labels is wrong."""
    rng = np.random.default_rng(seed)
    rows = []
    for c, name in enumerate(labels):
        for i in range(n_per_class):
            given = labels[(c + 1) % len(labels)] if i % 5 == 0 else name
            rows.append([f"{c * 1000 + i + rng.random():.6f}", given,
                         f"{rng.normal(c, 1):.6f}", f"{rng.normal(-c, 2):.6f}"])
    rows = [rows[i] for i in rng.permutation(len(rows))]
    write_csv(path, ["a", "label", "b", "c"], rows)
    return rows


def clean_csv(path, per_class=(4, 4, 4), labels=NAMES, seed=1):
    """Another column order and an extra column the training data does not have."""
    rng = np.random.default_rng(seed)
    rows = [[f"{rng.normal(c, 1):.6f}", f"{rng.normal(-c, 2):.6f}", str(i), labels[c],
             f"{5000 + 100 * c + i}.5"]
            for c, k in enumerate(per_class) for i in range(k)]
    write_csv(path, ["b", "c", "id", "label", "a"], rows)
    return rows


def features(row, cols=("a", "b", "c")):
    return np.array([float(row[k]) for k in cols], dtype=np.float32)


def save_png(path, pixels):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def image_folder(root, per_class=(5, 4, 6), names=NAMES, seed=0, size=(5, 6)):
    """One sub-folder per class of random RGB PNGs (every image different)."""
    rng = np.random.default_rng(seed)
    for name, k in zip(names, per_class):
        for i in range(k):
            save_png(root / name / f"img_{i:03d}.png",
                     rng.integers(0, 256, (*size, 3), dtype=np.uint8))


def png_pixels(path):
    from PIL import Image

    with Image.open(path) as im:
        return np.array(im.convert("RGB")).transpose(2, 0, 1)


# ------------------------------------------------------------------ CSV

def test_csv_with_a_clean_csv_as_meta_set_and_rows_in_the_users_terms(tmp_path):
    noisy_csv(tmp_path / "data.csv")
    clean_csv(tmp_path / "clean.csv")
    d = prepare(f"csv:{tmp_path / 'data.csv'}", meta=f"csv:{tmp_path / 'clean.csv'}", seed=3)
    assert d.classes == NAMES and d.record["classes"] == NAMES
    assert d.record["meta_source"] == "given" and d.record["meta_known_clean"] is True
    assert d.record["warnings"] == []
    # the meta set is the clean CSV, every row, read by column name
    clean = read_csv_rows(tmp_path / "clean.csv")
    assert len(d.meta) == len(clean) == 12
    np.testing.assert_array_equal(d.meta.source_rows, np.arange(12))
    assert d.meta.source_file == str(tmp_path / "clean.csv") and d.meta.source_paths is None
    for i, r in enumerate(d.meta.source_rows):
        np.testing.assert_array_equal(d.meta.store.x[d.meta.index[i]].numpy(), features(clean[r]))
        assert d.classes[int(d.meta.labels[i])] == clean[r]["label"]
    # preprocessed like the training data: the training statistics
    xm, _ = all_batches(d.meta)
    raw = np.stack([features(r) for r in clean])
    mean, std = d.train.view.mean.numpy(), d.train.view.std.numpy()
    np.testing.assert_allclose(xm.numpy(), (raw - mean) / std, atol=1e-5)
    # train and test point at the right CSV rows: features and labels, row by row
    rows = read_csv_rows(tmp_path / "data.csv")
    seen = []
    for split in (d.train, d.test):
        assert split.source_file == str(tmp_path / "data.csv")
        for i, r in enumerate(split.source_rows):
            np.testing.assert_array_equal(split.store.x[split.index[i]].numpy(), features(rows[r]))
            assert d.classes[int(split.labels[i])] == rows[r]["label"]
        seen += split.source_rows.tolist()
    assert sorted(seen) == list(range(len(rows)))  # nothing drawn out of the noisy file
    assert d.record["source_files"] == {"train": str(tmp_path / "data.csv"),
                                        "meta": str(tmp_path / "clean.csv"), "val": None,
                                        "test": str(tmp_path / "data.csv")}
    # split.npz keeps the rows
    z = load_split(d.save_split(tmp_path / "split.npz"))
    for name in ("train", "meta", "test"):
        np.testing.assert_array_equal(z[f"{name}_source_rows"], getattr(d, name).source_rows)
        assert z[f"{name}_source_paths"].size == 0
    assert z["val_index"].size == 0 and str(z["val_source"]) == "none"
    assert z["classes"].tolist() == NAMES and z["preprocess"] == d.preprocess
    # meta_per_class given: a balanced draw from the clean CSV
    d2 = prepare(f"csv:{tmp_path / 'data.csv'}", meta=f"csv:{tmp_path / 'clean.csv'}",
                 meta_per_class=2, seed=3)
    assert np.bincount(d2.meta.labels.numpy()).tolist() == [2, 2, 2]
    assert set(d2.meta.source_rows) <= set(range(12)) and d2.record["meta_per_class"] == 2


def test_clean_csv_with_a_missing_or_unknown_class_or_column(tmp_path):
    noisy_csv(tmp_path / "data.csv")
    clean_csv(tmp_path / "missing.csv", per_class=(3, 3, 0))
    with pytest.raises(UserError) as e:
        prepare(f"csv:{tmp_path / 'data.csv'}", meta=f"csv:{tmp_path / 'missing.csv'}")
    one_line_error(e, "'emu'", "0 examples", "missing.csv")
    clean_csv(tmp_path / "unknown.csv", labels=["cat", "dog", "wolf"])
    with pytest.raises(UserError) as e:
        prepare(f"csv:{tmp_path / 'data.csv'}", meta=f"csv:{tmp_path / 'unknown.csv'}")
    one_line_error(e, "'wolf'", "not a class", "unknown.csv")
    write_csv(tmp_path / "nocol.csv", ["a", "label"], [["1", "cat"], ["2", "dog"], ["3", "emu"]])
    with pytest.raises(UserError) as e:
        prepare(f"csv:{tmp_path / 'data.csv'}", meta=f"csv:{tmp_path / 'nocol.csv'}")
    one_line_error(e, "lacks the feature columns", "'b'", "'c'")
    write_csv(tmp_path / "nolabel.csv", ["a", "b", "c"], [["1", "2", "3"]])
    with pytest.raises(UserError) as e:
        prepare(f"csv:{tmp_path / 'data.csv'}", meta=f"csv:{tmp_path / 'nolabel.csv'}")
    one_line_error(e, "no label column 'label'")
    with pytest.raises(UserError) as e:
        prepare(f"csv:{tmp_path / 'data.csv'}", meta="digits")
    one_line_error(e, "csv:PATH, folder:PATH or npz:PATH")
    np.savez(tmp_path / "m.npz", x=np.zeros((3, 3), np.float32), y=np.array(NAMES))
    d = prepare(f"csv:{tmp_path / 'data.csv'}", meta=f"npz:{tmp_path / 'm.npz'}")
    assert len(d.meta) == 3 and d.meta.labels.tolist() == [0, 1, 2]


def test_csv_integer_labels_are_named_by_value(tmp_path):
    rows = [[str(i), str([10, 20, 30][i % 3])] for i in range(30)]
    rows = rows[::-1]
    write_csv(tmp_path / "d.csv", ["f", "label"], rows)
    write_csv(tmp_path / "m.csv", ["label", "f"], [["030", "100"], ["10", "101"], ["20.0", "102"]])
    d = prepare(f"csv:{tmp_path / 'd.csv'}", meta=f"csv:{tmp_path / 'm.csv'}")
    assert d.classes == ["10", "20", "30"]
    assert d.meta.labels.tolist() == [2, 0, 1]
    for i, r in enumerate(d.train.source_rows):
        assert d.classes[int(d.train.labels[i])] == rows[r][1]


def test_training_rows_equal_to_clean_rows_are_left_out(tmp_path):
    rows = noisy_csv(tmp_path / "data.csv")
    # the hand-checked rows were copied out of the training file, labels corrected
    copied = [rows[i] for i in (0, 7, 11, 20, 33, 41)]
    write_csv(tmp_path / "checked.csv", ["a", "label", "b", "c"],
              [[r[0], NAMES[k % 3], r[2], r[3]] for k, r in enumerate(copied)])
    d = prepare(f"csv:{tmp_path / 'data.csv'}", meta=f"csv:{tmp_path / 'checked.csv'}")
    used = set(d.train.source_rows) | set(d.test.source_rows)
    assert not {0, 7, 11, 20, 33, 41} & set(d.train.source_rows)
    left_out = 6 - len({0, 7, 11, 20, 33, 41} & set(d.test.source_rows))
    assert d.record["n_train_left_out_as_in_meta"] == left_out > 0
    assert len(used) == len(rows) - left_out
    assert any("left out of the training set" in w for w in d.record["warnings"])


# ------------------------------------------------------------------ image folders

def test_folder_with_a_clean_folder_as_meta_set_and_relative_paths(tmp_path):
    image_folder(tmp_path / "imgs", per_class=(6, 5, 7))
    image_folder(tmp_path / "checked", per_class=(2, 3, 2), seed=9)
    d = prepare(f"folder:{tmp_path / 'imgs'}", meta=f"folder:{tmp_path / 'checked'}", seed=1)
    assert d.classes == NAMES and d.input_shape == (3, 5, 6)
    assert d.record["warnings"] == [] and len(d.meta) == 7
    assert d.meta.source_paths == [f"{c}/img_{i:03d}.png" for c, k in zip(NAMES, (2, 3, 2))
                                   for i in range(k)]
    for split, root in ((d.train, "imgs"), (d.test, "imgs"), (d.meta, "checked")):
        assert split.source_file == str(tmp_path / root)
        for i, p in enumerate(split.source_paths):
            np.testing.assert_array_equal(split.store.x[split.index[i]].numpy(),
                                          png_pixels(tmp_path / root / p))
            assert p.split("/")[0] == d.classes[int(split.labels[i])]
    assert sorted(d.train.source_paths + d.test.source_paths) == sorted(
        p.relative_to(tmp_path / "imgs").as_posix() for p in (tmp_path / "imgs").rglob("*.png"))
    z = load_split(d.save_split(tmp_path / "split.npz"))
    assert z["train_source_paths"].tolist() == d.train.source_paths
    assert z["meta_source_paths"].tolist() == d.meta.source_paths
    # without a clean set: drawn from the folder names, which may be wrong
    d2 = prepare(f"folder:{tmp_path / 'imgs'}", meta_per_class=1)
    assert len(d2.record["warnings"]) == 1 and "not known to be clean" in d2.record["warnings"][0]
    assert d2.meta.source_paths[0].startswith("cat/")


def test_clean_folder_missing_or_unknown_class(tmp_path):
    image_folder(tmp_path / "imgs")
    image_folder(tmp_path / "few", per_class=(2, 2), names=["cat", "emu"])
    with pytest.raises(UserError) as e:
        prepare(f"folder:{tmp_path / 'imgs'}", meta=f"folder:{tmp_path / 'few'}")
    one_line_error(e, "'dog'", "0 examples")
    image_folder(tmp_path / "odd", per_class=(1, 1, 1, 1), names=NAMES + ["wasp"])
    with pytest.raises(UserError) as e:
        prepare(f"folder:{tmp_path / 'imgs'}", meta=f"folder:{tmp_path / 'odd'}")
    one_line_error(e, "'wasp'", "not a class")


def test_streamed_training_folder_reads_the_clean_folder_the_same_way(tmp_path):
    image_folder(tmp_path / "imgs")
    image_folder(tmp_path / "checked", per_class=(1, 1, 1), seed=5)
    kw = dict(meta=f"folder:{tmp_path / 'checked'}", image_size=4, seed=2)
    a = prepare(f"folder:{tmp_path / 'imgs'}", **kw)
    b = prepare(f"folder:{tmp_path / 'imgs'}", stream=True, **kw)
    assert b.meta.store.streaming and not a.meta.store.streaming
    assert a.meta.source_paths == b.meta.source_paths
    ra = a.meta.store.x.numpy()
    rb = torch.stack([b.meta.store[i] for i in range(len(b.meta))]).numpy()
    np.testing.assert_array_equal(ra, rb)


# ------------------------------------------------------------------ npz

def test_npz_label_values_and_meta_npz(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 4)).astype(np.float32)
    y = np.array([10, 20, 30])[np.arange(60) % 3]  # not 0..C-1
    np.savez(tmp_path / "d.npz", x_train=x, y_train=y, x_test=x[:6] + 1, y_test=y[:6])
    xm = rng.normal(size=(9, 4)).astype(np.float32)
    np.savez(tmp_path / "m.npz", x=xm, y=np.array([30, 20, 10] * 3))
    d = prepare(f"npz:{tmp_path / 'd.npz'}", meta=f"npz:{tmp_path / 'm.npz'}")
    assert d.classes == ["10", "20", "30"] and d.num_classes == 3
    assert d.meta.labels.tolist() == [2, 1, 0] * 3
    np.testing.assert_array_equal(d.meta.source_rows, np.arange(9))
    np.testing.assert_array_equal(d.meta.store.x[d.meta.index].numpy(), xm)
    for split, xs, ys in ((d.train, x, y), (d.test, x[:6] + 1, y[:6])):
        np.testing.assert_array_equal(split.store.x[split.index].numpy(), xs[split.source_rows])
        names = np.array(d.classes)[split.labels.numpy()]
        np.testing.assert_array_equal(names, ys[split.source_rows].astype(str))
    assert d.record["warnings"] == []
    # a meta npz with x_meta / y_meta and string labels; an unknown label
    np.savez(tmp_path / "m2.npz", x_meta=xm[:3], y_meta=np.array(["10", "20", "30"]))
    d = prepare(f"npz:{tmp_path / 'd.npz'}", meta=f"npz:{tmp_path / 'm2.npz'}")
    assert d.meta.labels.tolist() == [0, 1, 2]
    np.savez(tmp_path / "m3.npz", x=xm[:4], y=np.array([10, 20, 30, 40]))
    with pytest.raises(UserError) as e:
        prepare(f"npz:{tmp_path / 'd.npz'}", meta=f"npz:{tmp_path / 'm3.npz'}")
    one_line_error(e, "'40'", "not a class", "m3.npz")
    np.savez(tmp_path / "m4.npz", x=xm[:3, :2], y=np.array([10, 20, 30]))
    with pytest.raises(UserError) as e:
        prepare(f"npz:{tmp_path / 'd.npz'}", meta=f"npz:{tmp_path / 'm4.npz'}")
    one_line_error(e, "shape", "m4.npz")


def test_npz_string_labels(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (30, 6, 6), dtype=np.uint8)
    y = np.array(["zebra", "ant", "moth"])[np.arange(30) % 3]
    np.savez(tmp_path / "d.npz", x_train=x, y_train=y, x_test=x[:3], y_test=y[:3])
    d = prepare(f"npz:{tmp_path / 'd.npz'}", meta_per_class=2)
    assert d.classes == ["ant", "moth", "zebra"]
    np.testing.assert_array_equal(np.array(d.classes)[d.train.labels.numpy()], y[d.train.source_rows])
    assert "not known to be clean" in d.record["warnings"][0]
    # a clean meta set shipped in the file is clean: no warning
    np.savez(tmp_path / "e.npz", x_train=x, y_train=y, x_test=x[:3], y_test=y[:3],
             x_meta=x[:6], y_meta=y[:6])
    assert prepare(f"npz:{tmp_path / 'e.npz'}").record["warnings"] == []
    # y_train already noisy with its true labels known: drawn by true label, no warning
    np.savez(tmp_path / "f.npz", x_train=x, y_train=y[::-1], y_train_true=y, x_test=x[:3],
             y_test=y[:3])
    d = prepare(f"npz:{tmp_path / 'f.npz'}", meta_per_class=2)
    assert d.record["warnings"] == [] and d.record["meta_known_clean"] is True
    np.testing.assert_array_equal(np.array(d.classes)[d.meta.labels.numpy()], y[d.meta.source_rows])


# ------------------------------------------------------------------ validation sets

def test_val_per_class_on_digits_is_clean_disjoint_and_keeps_the_meta_set():
    base = prepare("digits", noise="uniform:0.4", meta_per_class=5, seed=4)
    d = prepare("digits", noise="uniform:0.4", meta_per_class=5, val_per_class=3, seed=4)
    assert len(d.val) == 30 and np.bincount(d.val.labels.numpy()).tolist() == [3] * 10
    assert torch.equal(d.meta.index, base.meta.index)  # the validation draw is extra
    tr, me, va = (set(s.index.tolist()) for s in (d.train, d.meta, d.val))
    assert not tr & me and not tr & va and not me & va
    assert len(d.train) == len(base.train) - 30
    from sklearn.datasets import load_digits

    digits = load_digits()
    for split in (d.train, d.meta, d.val, d.test):  # rows of scikit-learn's arrays
        np.testing.assert_array_equal(split.true_labels.numpy(), digits.target[split.source_rows])
    np.testing.assert_array_equal(
        d.val.store.x[d.val.index].numpy()[:, 0], (digits.images[d.val.source_rows] / 16).astype(np.float32))
    assert d.record["warnings"] == [] and d.record["val_source"] == "train"
    assert d.record["val_known_clean"] is True and d.record["counts"]["val"] == [3] * 10
    with pytest.raises(UserError) as e:
        prepare("digits", meta_per_class=100, val_per_class=50)
    one_line_error(e, "class", "the meta set needs 100 and the validation set 50 per class",
                   "val_per_class")
    with pytest.raises(UserError) as e:
        prepare("digits", val_per_class=-1)
    one_line_error(e, "val_per_class")


def test_val_per_class_from_a_given_meta_set(tmp_path):
    noisy_csv(tmp_path / "data.csv")
    clean_csv(tmp_path / "clean.csv", per_class=(5, 4, 6))
    spec = f"csv:{tmp_path / 'clean.csv'}"
    d = prepare(f"csv:{tmp_path / 'data.csv'}", meta=spec, val_per_class=2, seed=0)
    assert len(d.val) == 6 and len(d.meta) == 15 - 6
    assert set(d.val.source_rows).isdisjoint(d.meta.source_rows)
    assert sorted(d.val.source_rows.tolist() + d.meta.source_rows.tolist()) == list(range(15))
    assert d.val.source_file == str(tmp_path / "clean.csv") and d.record["val_source"] == "given"
    assert d.record["n_val"] == 6 and d.record["counts"]["val"] == [2, 2, 2]
    json.dumps(d.record)
    assert d.record["warnings"] == []
    z = load_split(d.save_split(tmp_path / "s"))
    np.testing.assert_array_equal(z["val_index"], d.val.index.numpy())
    np.testing.assert_array_equal(z["val_labels"], d.val.labels.numpy())
    np.testing.assert_array_equal(z["val_source_rows"], d.val.source_rows)
    assert str(z["val_source"]) == "given"
    d2 = prepare(f"csv:{tmp_path / 'data.csv'}", meta=spec, meta_per_class=2, val_per_class=2)
    assert np.bincount(d2.meta.labels.numpy()).tolist() == [2, 2, 2]
    assert set(d2.val.source_rows).isdisjoint(d2.meta.source_rows)
    with pytest.raises(UserError) as e:  # dog has 4: 4 for validation leaves none for meta
        prepare(f"csv:{tmp_path / 'data.csv'}", meta=spec, val_per_class=4)
    one_line_error(e, "'dog'", "has 4 examples", "validation set needs 4")
    with pytest.raises(UserError) as e:
        prepare(f"csv:{tmp_path / 'data.csv'}", meta=spec, meta_per_class=3, val_per_class=2)
    one_line_error(e, "'dog'", "meta set needs 3 and the validation set 2")
    # without a clean set the validation set comes from the user's labels, with a warning
    d3 = prepare(f"csv:{tmp_path / 'data.csv'}", meta_per_class=0, val_per_class=2)
    assert d3.meta is None and len(d3.val) == 6
    assert "validation set was drawn" in d3.record["warnings"][0]
    assert set(d3.val.source_rows).isdisjoint(d3.train.source_rows)
    assert prepare(f"csv:{tmp_path / 'data.csv'}", meta_per_class=0).record["warnings"] == []


# ------------------------------------------------------------------ load_new

def test_load_new_csv_reproduces_the_training_pipeline(tmp_path):
    noisy_csv(tmp_path / "data.csv")
    d = prepare(f"csv:{tmp_path / 'data.csv'}", meta_per_class=2)
    pre = json.loads(json.dumps(d.preprocess))  # plain JSON
    assert pre["kind"] == "csv" and pre["feature_columns"] == ["a", "b", "c"]
    rows = read_csv_rows(tmp_path / "data.csv")
    test_rows = [rows[r] for r in d.test.source_rows]
    # columns in another order, an extra one; then the same without labels
    write_csv(tmp_path / "new.csv", ["id", "c", "label", "a", "b"],
              [[k, r["c"], r["label"], r["a"], r["b"]] for k, r in enumerate(test_rows)])
    write_csv(tmp_path / "unlabelled.csv", ["b", "a", "c"],
              [[r["b"], r["a"], r["c"]] for r in test_rows])
    want_x, want_y = all_batches(d.test)
    new = load_new(f"csv:{tmp_path / 'new.csv'}", pre, d.classes)
    assert new.has_labels and len(new) == len(d.test)
    np.testing.assert_array_equal(new.source_rows, np.arange(len(d.test)))
    assert new.source_paths is None and new.source_file == str(tmp_path / "new.csv")
    x, y = all_batches(new.split)
    assert torch.equal(x, want_x) and torch.equal(y, want_y)
    new = load_new(str(tmp_path / "unlabelled.csv"), pre, d.classes)
    x, y = all_batches(new.split)
    assert not new.has_labels and torch.equal(x, want_x) and (y == -1).all()
    # split.npz alone is enough: preprocess and classes are in it
    z = load_split(d.save_split(tmp_path / "split.npz"))
    x, _ = all_batches(load_new(f"csv:{tmp_path / 'unlabelled.csv'}", z["preprocess"],
                                z["classes"].tolist()).split)
    assert torch.equal(x, want_x)
    write_csv(tmp_path / "short.csv", ["a", "label"], [["1", "cat"]])
    with pytest.raises(UserError) as e:
        load_new(f"csv:{tmp_path / 'short.csv'}", pre, d.classes)
    one_line_error(e, "lacks the feature columns", "'b'", "'c'")
    write_csv(tmp_path / "wolf.csv", ["a", "b", "c", "label"], [["1", "2", "3", "wolf"]])
    with pytest.raises(UserError) as e:
        load_new(f"csv:{tmp_path / 'wolf.csv'}", pre, d.classes)
    one_line_error(e, "'wolf'", "not a class")
    with pytest.raises(UserError) as e:
        load_new(f"csv:{tmp_path / 'wolf.csv'}", {"kind": "csv"}, d.classes)
    one_line_error(e, "preprocess lacks")


def test_load_new_image_folders_reproduce_the_training_pipeline(tmp_path):
    image_folder(tmp_path / "imgs", per_class=(6, 5, 7), size=(7, 9))
    d = prepare(f"folder:{tmp_path / 'imgs'}", image_size=(5, 6), meta_per_class=1)
    pre = json.loads(json.dumps(d.preprocess))
    assert pre["image_size"] == [5, 6] and pre["channels"] == 3 and pre["dtype"] == "uint8"
    flat, labelled = tmp_path / "flat", tmp_path / "labelled"
    flat.mkdir()
    for k, p in enumerate(d.test.source_paths):  # sorted names keep the test order
        shutil.copy(tmp_path / "imgs" / p, flat / f"{k:03d}.png")
        (labelled / p.split("/")[0]).mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp_path / "imgs" / p, labelled / p)
    want_x, want_y = all_batches(d.test)
    new = load_new(f"folder:{flat}", pre, d.classes)
    assert not new.has_labels and new.source_paths == [f"{k:03d}.png" for k in range(len(d.test))]
    x, y = all_batches(new.split)
    assert torch.equal(x, want_x) and (y == -1).all()
    new = load_new(f"folder:{labelled}", pre, d.classes, stream=True)
    assert new.has_labels and new.source_paths == d.test.source_paths  # class order, sorted
    x, y = all_batches(new.split)
    assert torch.equal(x, want_x) and torch.equal(y, want_y)
    shutil.copy(flat / "000.png", labelled / "stray.png")
    with pytest.raises(UserError) as e:
        load_new(f"folder:{labelled}", pre, d.classes)
    one_line_error(e, "both image files and class sub-folders")
    (labelled / "stray.png").unlink()
    (labelled / "cat").rename(labelled / "lynx")
    with pytest.raises(UserError) as e:
        load_new(f"folder:{labelled}", pre, d.classes)
    one_line_error(e, "'lynx'", "not a class")


def test_load_new_npz_on_digits(tmp_path):
    from sklearn.datasets import load_digits

    d = prepare("digits", meta_per_class=2)
    images = (load_digits().images / 16).astype(np.float32)  # the rows are sklearn's rows
    path = tmp_path / "new.npz"
    np.savez(path, x=images[d.test.source_rows], y=np.array(d.classes)[d.test.labels.numpy()])
    new = load_new(f"npz:{path}", d.preprocess, d.classes)
    x, y = all_batches(new.split)
    want_x, want_y = all_batches(d.test)
    assert new.has_labels and torch.equal(x, want_x) and torch.equal(y, want_y)
    np.savez(path, x=images[d.test.source_rows])
    new = load_new(f"npz:{path}", d.preprocess)  # classes recorded in preprocess
    assert not new.has_labels and torch.equal(all_batches(new.split)[0], want_x)
    np.savez(path, x=(images[:4] * 255).astype(np.uint8))
    with pytest.raises(UserError) as e:
        load_new(f"npz:{path}", d.preprocess, d.classes)
    one_line_error(e, "uint8", "float32")


def test_files_digest_follows_the_files(tmp_path):
    """A CSV's digest is its bytes' SHA-256; a folder's changes with any
    file's name, size or modification time; built-in datasets have none."""
    import hashlib
    import os

    from gdw.data.sources import files_digest

    f = tmp_path / "a.csv"
    f.write_text("x,label\n1,a\n")
    assert files_digest(f"csv:{f}") == "sha256:" + hashlib.sha256(f.read_bytes()).hexdigest()
    f.write_text("x,label\n2,a\n")  # same size, other bytes
    assert files_digest(f"csv:{f}") == "sha256:" + hashlib.sha256(f.read_bytes()).hexdigest()
    folder = tmp_path / "imgs"
    (folder / "cat").mkdir(parents=True)
    (folder / "cat" / "1.png").write_bytes(b"12345")
    first = files_digest(f"folder:{folder}")
    assert files_digest(str(folder)) == first  # a bare path is the same folder
    (folder / "cat" / "2.png").write_bytes(b"1")
    second = files_digest(f"folder:{folder}")
    os.utime(folder / "cat" / "1.png", ns=(1, 1))
    third = files_digest(f"folder:{folder}")
    assert len({first, second, third}) == 3
    assert files_digest("digits") is None and files_digest("fashion-mnist") is None


# ------------------------------------------------------------------ your own test set (test=)

def test_a_given_test_csv_is_the_test_split_and_the_whole_file_trains(tmp_path):
    """test=: the hand-checked CSV is the test split, row by row, labels by
    name; the training CSV is not split, so every row is training, meta or
    validation."""
    rows = noisy_csv(tmp_path / "data.csv")
    clean_csv(tmp_path / "checked.csv")
    test_rows = clean_csv(tmp_path / "test.csv", per_class=(3, 2, 4), seed=5)
    d = prepare(f"csv:{tmp_path / 'data.csv'}", meta=f"csv:{tmp_path / 'checked.csv'}",
                test=f"csv:{tmp_path / 'test.csv'}", val_per_class=1, seed=2)
    read = read_csv_rows(tmp_path / "test.csv")
    assert len(d.test) == len(test_rows) == 9
    assert d.test.source_file == str(tmp_path / "test.csv")
    for i, r in enumerate(d.test.source_rows):
        np.testing.assert_array_equal(d.test.store.x[d.test.index[i]].numpy(), features(read[r]))
        assert d.classes[int(d.test.labels[i])] == read[r]["label"]
    # preprocessed with the training statistics, like the meta set
    xt, _ = all_batches(d.test)
    raw = np.stack([features(r) for r in read])
    np.testing.assert_allclose(xt.numpy(), (raw - d.train.view.mean.numpy()) / d.train.view.std.numpy(), atol=1e-5)
    assert sorted(d.train.source_rows.tolist()) == list(range(len(rows)))  # no test split taken out
    assert d.record["test"] == f"csv:{tmp_path / 'test.csv'}" and d.record["counts"]["test"] == [3, 2, 4]
    assert d.record["source_files"]["test"] == str(tmp_path / "test.csv")
    assert d.record["n_train_left_out_as_in_test"] == 0 and d.record["warnings"] == []
    assert d.record["order"].startswith("test set given")
    # without test=: the usual stratified split of the file
    plain = prepare(f"csv:{tmp_path / 'data.csv'}", meta=f"csv:{tmp_path / 'checked.csv'}", seed=2)
    assert plain.record["test"] is None and plain.test.source_file == str(tmp_path / "data.csv")
    assert len(plain.train) + len(plain.test) == len(rows)


def test_training_rows_equal_to_test_rows_are_left_out_of_every_other_split(tmp_path):
    """Rows copied from the training file into the test set (labels
    corrected) must not be trained on, nor drawn for the meta or validation
    sets: the test accuracy would be measured on examples seen in training."""
    rows = noisy_csv(tmp_path / "data.csv", n_per_class=30)
    copied = [0, 4, 9, 17, 25, 38, 52, 60, 71, 88]
    write_csv(tmp_path / "test.csv", ["a", "label", "b", "c"],
              [[rows[i][0], NAMES[k % 3], rows[i][2], rows[i][3]] for k, i in enumerate(copied)])
    for seed in range(3):  # meta and validation drawn from the training file itself
        d = prepare(f"csv:{tmp_path / 'data.csv'}", test=f"csv:{tmp_path / 'test.csv'}", meta_per_class=5,
                    val_per_class=3, seed=seed)
        for split in (d.train, d.meta, d.val):
            assert not set(copied) & set(split.source_rows.tolist())
        used = set(d.train.source_rows.tolist()) | set(d.meta.source_rows.tolist()) | set(d.val.source_rows.tolist())
        assert used == set(range(len(rows))) - set(copied)
        assert d.record["n_train_left_out_as_in_test"] == len(copied)
        assert any("10 training examples" in w and "test set" in w for w in d.record["warnings"])


def test_a_given_test_set_with_an_unknown_class_or_no_labels_is_refused(tmp_path):
    noisy_csv(tmp_path / "data.csv")
    clean_csv(tmp_path / "wolf.csv", labels=["cat", "dog", "wolf"])
    with pytest.raises(UserError) as e:
        prepare(f"csv:{tmp_path / 'data.csv'}", test=f"csv:{tmp_path / 'wolf.csv'}")
    one_line_error(e, "'wolf'", "wolf.csv")
    write_csv(tmp_path / "nolabel.csv", ["a", "b", "c"], [["1", "2", "3"]])
    with pytest.raises(UserError) as e:
        prepare(f"csv:{tmp_path / 'data.csv'}", test=f"csv:{tmp_path / 'nolabel.csv'}")
    one_line_error(e, "no label column 'label'")
    with pytest.raises(UserError) as e:
        prepare(f"csv:{tmp_path / 'data.csv'}", test=f"csv:{tmp_path / 'missing.csv'}")
    one_line_error(e, "missing.csv")


def test_a_given_test_folder_replaces_the_split_of_an_image_folder(tmp_path):
    image_folder(tmp_path / "imgs", per_class=(6, 5, 7))
    image_folder(tmp_path / "held", per_class=(2, 2, 3), seed=4)
    d = prepare(f"folder:{tmp_path / 'imgs'}", test=f"folder:{tmp_path / 'held'}", meta_per_class=1, seed=0)
    assert len(d.train) + len(d.meta) == 18 and len(d.test) == 7
    assert d.test.labels.tolist() == [0, 0, 1, 1, 2, 2, 2]
    assert all(p.split("/")[0] == NAMES[int(c)] for p, c in zip(d.test.source_paths, d.test.labels))


# ------------------------------------------------------------------ CSV columns

def test_two_columns_of_one_name_are_refused(tmp_path):
    """The second column of a name was read as the first one's values."""
    write_csv(tmp_path / "d.csv", ["a", "b", "a", "label"], [["1", "2", "9", "cat"], ["3", "4", "8", "dog"]])
    with pytest.raises(UserError) as e:
        prepare(f"csv:{tmp_path / 'd.csv'}", meta_per_class=0, test_fraction=0.5)
    one_line_error(e, "two columns named 'a'", "d.csv")


def test_a_column_without_a_name_is_not_a_feature(tmp_path):
    """pandas' to_csv writes its index under an empty name: it is no feature,
    in the training file and in a clean file without it."""
    rows = noisy_csv(tmp_path / "plain.csv")
    write_csv(tmp_path / "indexed.csv", ["", "a", "label", "b", "c"], [[str(i), *r] for i, r in enumerate(rows)])
    clean_csv(tmp_path / "clean.csv")
    d = prepare(f"csv:{tmp_path / 'indexed.csv'}", meta=f"csv:{tmp_path / 'clean.csv'}")
    plain = prepare(f"csv:{tmp_path / 'plain.csv'}", meta=f"csv:{tmp_path / 'clean.csv'}")
    assert d.preprocess["feature_columns"] == ["a", "b", "c"] and d.input_shape == (3,)
    for i, r in enumerate(d.train.source_rows):
        row = dict(zip(["a", "label", "b", "c"], rows[r]))
        np.testing.assert_array_equal(d.train.store.x[d.train.index[i]].numpy(), features(row))
    torch.testing.assert_close(all_batches(d.meta), all_batches(plain.meta))


@pytest.mark.parametrize("sep", [";", "\t"])
def test_semicolon_and_tab_delimited_files_read_as_commas(tmp_path, sep):
    rows = noisy_csv(tmp_path / "comma.csv")
    with open(tmp_path / "other.csv", "w", newline="") as f:
        csv.writer(f, delimiter=sep).writerows([["a", "label", "b", "c"], *rows])
    a, b = (prepare(f"csv:{tmp_path / n}", meta_per_class=2) for n in ("comma.csv", "other.csv"))
    torch.testing.assert_close(all_batches(a.train), all_batches(b.train))
    assert a.classes == b.classes == NAMES


def test_features_and_ignore_choose_the_columns(tmp_path):
    rows = noisy_csv(tmp_path / "d.csv")
    d = prepare(f"csv:{tmp_path / 'd.csv'}", meta_per_class=0, features="c, b")
    e = prepare(f"csv:{tmp_path / 'd.csv'}", meta_per_class=0, ignore=["a"])
    assert d.preprocess["feature_columns"] == ["c", "b"] and e.preprocess["feature_columns"] == ["b", "c"]
    for i, r in enumerate(d.train.source_rows):
        row = dict(zip(["a", "label", "b", "c"], rows[r]))
        np.testing.assert_array_equal(d.train.store.x[d.train.index[i]].numpy(), features(row, ("c", "b")))
        np.testing.assert_array_equal(e.train.store.x[e.train.index[i]].numpy(), features(row, ("b", "c")))
    for kw, needle in (({"features": "b,z"}, "'z'"), ({"ignore": "label"}, "'label'")):
        with pytest.raises(UserError) as err:
            prepare(f"csv:{tmp_path / 'd.csv'}", meta_per_class=0, **kw)
        one_line_error(err, needle, "not a feature column")
    with pytest.raises(UserError) as err:
        prepare("digits", features="a")
    one_line_error(err, "csv: dataset")


def test_text_columns_are_one_hot_with_the_categories_kept_for_new_data(tmp_path):
    rng = np.random.default_rng(0)
    colours = ["red", "green", "blue"]
    rows = [[f"{rng.normal():.4f}", colours[i % 3], NAMES[i % 3]] for i in range(45)]
    write_csv(tmp_path / "d.csv", ["x", "colour", "label"], rows)
    d = prepare(f"csv:{tmp_path / 'd.csv'}", meta_per_class=2)
    assert d.preprocess["categories"] == {"colour": ["blue", "green", "red"]} and d.input_shape == (4,)
    for split in (d.train, d.meta, d.test):
        for i, r in enumerate(split.source_rows):
            x, colour = float(rows[r][0]), rows[r][1]
            want = [x, colour == "blue", colour == "green", colour == "red"]
            np.testing.assert_array_equal(split.store.x[split.index[i]].numpy(), np.array(want, np.float32))
    write_csv(tmp_path / "new.csv", ["colour", "x"], [["green", "0.5"], ["purple", "1.5"]])
    new = load_new(f"csv:{tmp_path / 'new.csv'}", d.preprocess)
    np.testing.assert_array_equal(new.split.store.x.numpy(), [[0.5, 0, 1, 0], [1.5, 0, 0, 0]])  # unseen: zeros
    write_csv(tmp_path / "typo.csv", ["x", "colour", "label"], [*rows[:5], ["n/a", "red", "cat"]])
    with pytest.raises(UserError) as e:  # a column of numbers with one text value stays an error
        prepare(f"csv:{tmp_path / 'typo.csv'}", meta_per_class=0, test_fraction=0.5)
    one_line_error(e, "line 7", "'x'", "'n/a'")


def test_an_npz_of_object_arrays_says_how_to_save_it(tmp_path):
    np.savez(tmp_path / "d.npz", x_train=np.zeros((4, 2)), y_train=np.array(["a", "b", "a", "b"], dtype=object),
             x_test=np.zeros((2, 2)), y_test=np.array(["a", "b"]))
    with pytest.raises(UserError) as e:
        prepare(f"npz:{tmp_path / 'd.npz'}")
    one_line_error(e, "d.npz", ".astype(str)")


# ------------------------------------------------------------------ one example in two places

def test_clean_rows_copied_from_the_data_are_neither_trained_nor_tested_on(tmp_path):
    """Rows of the hand-checked set that are also in the data file are left
    out of the test split too, and rows in the file twice (one copy drawn
    for the test split) are left out of training; the record counts both."""
    rows = noisy_csv(tmp_path / "data.csv", n_per_class=30)
    rows += [rows[i] for i in range(1, 60, 2)]  # 30 rows twice
    write_csv(tmp_path / "data.csv", ["a", "label", "b", "c"], rows)
    copied = [0, 6, 13, 21, 34, 40, 47, 55, 62, 70, 77, 85]
    write_csv(tmp_path / "checked.csv", ["a", "label", "b", "c"], [rows[i] for i in copied])
    d = prepare(f"csv:{tmp_path / 'data.csv'}", meta=f"csv:{tmp_path / 'checked.csv'}")
    key = [tuple(r[k] for k in (0, 2, 3)) for r in rows]
    meta, train, test = ({key[i] for i in copied}, [key[r] for r in d.train.source_rows],
                         [key[r] for r in d.test.source_rows])
    assert not meta & set(test) and not meta & set(train) and not set(train) & set(test)
    # worked out from the rows of the file's stratified split: the test rows held back, the training rows dropped
    tr, te = stratified_split(np.array([NAMES.index(r[1]) for r in rows]), 0.2)
    dropped = [r for r in te if key[r] in meta]
    assert d.record["n_test_left_out_as_in_meta"] == len(dropped) == len(te) - len(d.test) > 0
    kept_test = {key[r] for r in te} - meta
    assert d.record["n_train_left_out_as_in_test"] == sum(key[r] in kept_test for r in tr) > 0
    assert len(d.train) == sum(key[r] not in meta | kept_test for r in tr)
    assert any("test examples" in w and "left out of the test split" in w for w in d.record["warnings"])


def test_the_training_file_as_its_own_meta_set_is_one_line(tmp_path):
    noisy_csv(tmp_path / "data.csv")
    with pytest.raises(UserError) as e:
        prepare(f"csv:{tmp_path / 'data.csv'}", meta=f"csv:{tmp_path / 'data.csv'}")
    one_line_error(e, "no training examples are left", "not the data file itself")
