"""The label-issue trials a user runs, on files the tests write: a CSV with
30% of its labels replaced by another class plus a clean CSV, and an image
folder with 30% of its images in a wrong class folder. The flagged set must
be mostly right and find most wrong labels, the estimate must be near the
truth, and --export must give the data back without (or relabelling) them."""

import json

import numpy as np

from gdw.cli import main

from test_own_data import read_csv_rows as read_rows, write_csv

NAMES = ["cat", "dog", "emu"]


def clusters(rng, n_per_class, dims=6):
    """Rows of three well-separated Gaussian clusters, shuffled: (features, true class)."""
    true = np.repeat(np.arange(3), n_per_class)
    x = rng.normal(0, 1, (len(true), dims)) + 3.0 * np.eye(3, dims)[true]
    order = rng.permutation(len(true))
    return x[order], true[order]


def wrong_labels(rng, true, share=0.3):
    """Replace ``share`` of the labels by another class, at random: (labels, wrong mask)."""
    wrong = np.zeros(len(true), bool)
    wrong[rng.choice(len(true), int(share * len(true)), replace=False)] = True
    given = true.copy()
    given[wrong] = (true[wrong] + rng.integers(1, 3, wrong.sum())) % 3
    return given, wrong


def flagged_of(run, split=None):
    """The flagged rows of label_issues.csv (of one split, or all), and all its rows."""
    rows = read_rows(run / "label_issues.csv")
    return {int(r["index"]) for r in rows if r["is_label_issue"] == "true" and split in (None, r["split"])}, rows


def precision_recall(flagged, wrong_rows):
    hits = len(flagged & wrong_rows)
    return hits / max(len(flagged), 1), hits / len(wrong_rows)


def test_csv_with_30_percent_wrong_labels_and_a_clean_csv(tmp_path, capsys):
    rng = np.random.default_rng(0)
    x, true = clusters(rng, 300)
    given, wrong = wrong_labels(rng, true)
    header = ["f%d" % j for j in range(x.shape[1])] + ["label"]
    write_csv(tmp_path / "data.csv", header, [[f"{v:.5f}" for v in row] + [NAMES[g]] for row, g in zip(x, given)])
    xc, tc = clusters(rng, 30)
    write_csv(tmp_path / "checked.csv", header, [[f"{v:.5f}" for v in row] + [NAMES[t]] for row, t in zip(xc, tc)])
    run = tmp_path / "run"
    assert main(["train", "--dataset", f"csv:{tmp_path / 'data.csv'}", "--meta", f"csv:{tmp_path / 'checked.csv'}",
                 "--val-per-class", "5", "--method", "gdw", "--epochs", "15", "--out", str(run),
                 "--no-progress"]) == 0
    flagged, rows = flagged_of(run)
    trained = {int(r["index"]) for r in rows}
    assert trained == set(range(len(given)))  # every row is checked, the test split's included
    assert {r["split"] for r in rows} == {"train", "test"}
    wrong_rows = {i for i in trained if wrong[i]}
    precision, recall = precision_recall(flagged, wrong_rows)
    assert precision >= 0.8 and recall >= 0.8, (precision, recall)
    summary = json.loads((run / "summary.json").read_text())
    train_rows = {int(r["index"]) for r in rows if r["split"] == "train"}
    truth = np.mean([wrong[i] for i in train_rows])
    assert abs(summary["estimated_noise_rate"] - truth) <= 0.05
    lo, hi = summary["estimated_noise_interval"]
    assert lo <= summary["estimated_noise_rate"] <= hi

    # gdw detect prints the estimate; --export writes the file without the flagged rows, the rest as read
    capsys.readouterr()
    assert main(["detect", str(run), "--export", str(tmp_path / "kept.csv")]) == 0
    out = capsys.readouterr().out
    assert "estimated wrong labels" in out and f"wrote {tmp_path / 'kept.csv'}" in out
    original = read_rows(tmp_path / "data.csv")
    kept = read_rows(tmp_path / "kept.csv")
    assert kept == [r for i, r in enumerate(original) if i not in flagged]
    # --relabel keeps every row; a flagged row's label becomes its suggested label
    assert main(["detect", str(run), "--export", str(tmp_path / "relabelled.csv"), "--relabel"]) == 0
    relabelled = read_rows(tmp_path / "relabelled.csv")
    suggested = {int(r["index"]): r["suggested_label"] for r in rows}
    assert len(relabelled) == len(original)
    for i, (a, b) in enumerate(zip(original, relabelled)):
        assert b == ({**a, "label": suggested[i]} if i in flagged else a)
    # the suggestions are mostly the true class
    fixed = [suggested[i] == NAMES[true[i]] for i in flagged & wrong_rows]
    assert np.mean(fixed) >= 0.8


def test_image_folder_with_30_percent_of_images_in_a_wrong_folder(tmp_path, capsys):
    from PIL import Image

    rng = np.random.default_rng(1)
    n = 90

    def image(c):
        """8×8 grey: a bright bar in class c's third of the image, plus noise."""
        px = rng.normal(60, 20, (8, 8))
        px[:, 3 * c:3 * c + 2] += 150
        return np.clip(px, 0, 255).astype(np.uint8)

    true = np.repeat(np.arange(3), n)
    given, wrong = wrong_labels(rng, true)
    paths = {}
    for k, (t, g) in enumerate(zip(true, given)):
        path = tmp_path / "images" / NAMES[g] / f"img_{k:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image(t)).save(path)
        paths[f"{NAMES[g]}/img_{k:03d}.png"] = bool(wrong[k])
    for c in range(3):
        for k in range(10):
            path = tmp_path / "checked" / NAMES[c] / f"c_{k}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image(c)).save(path)
    run = tmp_path / "run"
    assert main(["train", "--dataset", f"folder:{tmp_path / 'images'}", "--meta", f"folder:{tmp_path / 'checked'}",
                 "--method", "gdw", "--epochs", "15", "--out", str(run), "--no-progress"]) == 0
    rows = read_rows(run / "label_issues.csv")
    flagged = {r["path"] for r in rows if r["is_label_issue"] == "true"}
    wrong_paths = {r["path"] for r in rows if paths[r["path"]]}
    precision, recall = precision_recall(flagged, wrong_paths)
    assert precision >= 0.8 and recall >= 0.8, (precision, recall)
    capsys.readouterr()
    assert main(["detect", str(run), "--export", str(tmp_path / "moves.csv"), "--relabel"]) == 0
    moves = read_rows(tmp_path / "moves.csv")
    assert {m["path"] for m in moves} == flagged
    for m in moves:
        assert m["path"].startswith(m["given_label"] + "/") and m["suggested_label"] != m["given_label"]


def test_export_needs_the_users_own_data_and_relabel_needs_export(tmp_path, capsys):
    assert main(["detect", str(tmp_path), "--relabel"]) == 2
    assert "--relabel goes with --export" in capsys.readouterr().err
    # a run on a built-in dataset has no file of the user's to write back
    run = tmp_path / "digits"
    assert main(["train", "--dataset", "digits", "--epochs", "1", "--out", str(run), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["detect", str(run), "--export", str(tmp_path / "x.csv")]) == 2
    assert "--export works on the user's own data" in capsys.readouterr().err


def test_npz_export_leaves_out_or_relabels_the_flagged_rows(tmp_path, capsys):
    rng = np.random.default_rng(2)
    x, true = clusters(rng, 100)
    given, _ = wrong_labels(rng, true, 0.2)
    xt, tt = clusters(rng, 10)
    np.savez(tmp_path / "data.npz", x_train=x.astype(np.float32), y_train=given * 10,  # label values 0, 10, 20
             x_test=xt.astype(np.float32), y_test=tt * 10)
    run = tmp_path / "run"
    assert main(["train", "--dataset", f"npz:{tmp_path / 'data.npz'}", "--epochs", "8", "--out", str(run),
                 "--no-progress"]) == 0
    flagged, rows = flagged_of(run, "train")
    test_flagged, _ = flagged_of(run, "test")
    assert flagged
    suggested = {(r["split"], int(r["index"])): int(r["suggested_label"]) for r in rows}
    assert main(["detect", str(run), "--export", str(tmp_path / "kept.npz")]) == 0
    assert main(["detect", str(run), "--export", str(tmp_path / "fixed.npz"), "--relabel"]) == 0
    keep = np.array([i not in flagged for i in range(len(given))])
    with np.load(tmp_path / "kept.npz") as z:
        np.testing.assert_array_equal(z["x_train"], x.astype(np.float32)[keep])
        np.testing.assert_array_equal(z["y_train"], (given * 10)[keep])
        test_keep = np.array([i not in test_flagged for i in range(len(tt))])
        np.testing.assert_array_equal(z["y_test"], (tt * 10)[test_keep])
    with np.load(tmp_path / "fixed.npz") as z:
        np.testing.assert_array_equal(z["x_train"], x.astype(np.float32))
        expected = np.array([suggested["train", i] if i in flagged else 10 * g for i, g in enumerate(given)])
        np.testing.assert_array_equal(z["y_train"], expected)
        expected = np.array([suggested["test", i] if i in test_flagged else 10 * t for i, t in enumerate(tt)])
        np.testing.assert_array_equal(z["y_test"], expected)


def test_csv_export_numbers_rows_as_the_reader_does(tmp_path):
    """A blank line is no data row for the reader, so it is none for --export
    either: the flagged row 1 is the file's third line of data text, not the blank."""
    from gdw.export import _csv

    src = tmp_path / "d.csv"
    src.write_text("a;label\n1;x\n\n2;y\n3;x\n")
    assert _csv(src, tmp_path / "kept.csv", {1: None}, ["x", "y"], "label", relabel=False) == 2
    assert (tmp_path / "kept.csv").read_text() == "a;label\n1;x\n3;x\n"
    assert _csv(src, tmp_path / "fixed.csv", {1: 0}, ["x", "y"], "label", relabel=True) == 3
    assert (tmp_path / "fixed.csv").read_text() == "a;label\n1;x\n2;x\n3;x\n"


def test_hard_classes_and_a_small_clean_set_make_the_estimate_say_it_is_rough(tmp_path, capsys):
    """Two heavily overlapping classes, 5% of the labels swapped, 10 checked rows per class: the model
    learns all 20 checked rows but errs on about a third of new rows, so the meta set's correction
    subtracts almost none of its own mistakes and the estimate lands far above 5%. The run says so
    (summary.json, the end of gdw train, gdw detect), with the numbers it judged by."""
    rng = np.random.default_rng(0)
    header = ["f%d" % j for j in range(30)] + ["label"]

    def rows(n):
        y = rng.integers(0, 2, n)
        x = rng.normal(0, 1, (n, 30))
        x[:, :3] += 0.35 * (2 * y[:, None] - 1)
        return x, y

    x, true = rows(800)
    given, wrong = true.copy(), rng.random(800) < 0.05
    given[wrong] = 1 - given[wrong]
    write_csv(tmp_path / "data.csv", header, [[f"{v:.4f}" for v in r] + [NAMES[g]] for r, g in zip(x, given)])
    xc, tc = rows(20)
    write_csv(tmp_path / "checked.csv", header, [[f"{v:.4f}" for v in r] + [NAMES[t]] for r, t in zip(xc, tc)])
    run = tmp_path / "run"
    assert main(["train", "--dataset", f"csv:{tmp_path / 'data.csv'}", "--meta", f"csv:{tmp_path / 'checked.csv'}",
                 "--method", "gdw", "--epochs", "15", "--out", str(run), "--no-progress"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    z = np.load(run / "label_evidence.npz")
    err = float((z["meta_prob"].argmax(1) != z["meta_given"]).mean())
    disagree = float((z["test_prob"].argmax(1) != z["test_given"]).mean())
    assert wrong.mean() < 0.06 and summary["estimated_noise_rate"] > 0.15  # far above the truth
    assert disagree > err + summary["estimated_noise_rate"] + 0.05  # what the caveat is judged by
    caveat = summary["estimated_noise_caveat"]
    assert f"{100 * disagree:.0f}% of the labels of {len(z['test_given'])} rows" in caveat
    assert f"errs on {100 * err:.0f}% of the {len(z['meta_given'])} clean" in caveat
    assert caveat.endswith("--folds 3 with the same training flags and --val-per-class N counts out of sample "
                           "(3 trainings)") and caveat.count("--folds") == 1
    assert str(z["noise_caveat"]) == caveat
    assert "is rough: " + caveat in capsys.readouterr().out
    assert main(["detect", str(run)]) == 0
    assert "caution: " + caveat in capsys.readouterr().out
