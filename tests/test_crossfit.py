"""gdw detect --folds N: every training row scored by a model that did not train on it."""

import csv

import numpy as np
import pytest

from gdw.cli import main
from gdw.data import prepare
from gdw.data.prepare import fold_keep


def test_the_folds_partition_the_rows_by_label():
    labels = np.repeat(np.arange(3), [10, 7, 5])
    held = [~fold_keep(labels, f"{k}/3", seed=4) for k in range(3)]
    assert np.array_equal(sum(h.astype(int) for h in held), np.ones(len(labels), int))  # each row in one fold
    for h in held:  # each class dealt evenly
        sizes = np.bincount(labels[h], minlength=3)
        assert all(abs(int(s) - n / 3) < 1 for s, n in zip(sizes, (10, 7, 5)))
    assert np.array_equal(fold_keep(labels, "1/3", 4), fold_keep(labels, "1/3", 4))


def test_detect_folds_scores_every_training_row_once(tmp_path, capsys):
    out = tmp_path / "cf"
    flags = ["--dataset", "digits", "--noise", "uniform:0.3", "--method", "ce", "--epochs", "4",
             "--meta-per-class", "5", "--val-per-class", "5"]
    assert main(["detect", *flags, "--folds", "2", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    with open(out / "label_issues.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    whole = prepare("digits", noise="uniform:0.3", meta_per_class=5, val_per_class=5, seed=0)
    train_rows = whole.train.source_rows
    assert sorted(int(r["index"]) for r in rows) == sorted(int(v) for v in train_rows)
    wrong = {int(r): bool(t != g) for r, g, t in zip(train_rows, whole.train.labels.numpy(),
                                                      whole.train.true_labels.numpy())}
    flagged = [int(r["index"]) for r in rows if r["is_label_issue"] == "true"]
    assert np.mean([wrong[r] for r in flagged]) > 0.7
    share = float(printed.split("estimated wrong labels: ")[1].split("%")[0]) / 100
    assert abs(share - np.mean(list(wrong.values()))) < 0.08
    assert "corrected by the validation split" in printed and "against the true labels" in printed


@pytest.mark.parametrize("argv, needle", [
    (["detect", "--dataset", "digits", "--folds", "1"], "--folds must be a whole number >= 2"),
    (["detect", "somerun", "--folds", "3"], "--folds trains its own runs"),
    (["train", "--holdout", "3/3"], "--holdout must be K/N"),
])
def test_fold_mistakes_are_one_line(argv, needle, capsys, tmp_path):
    assert main([*argv, "--out", str(tmp_path / "x")]) == 2
    assert needle in capsys.readouterr().err
