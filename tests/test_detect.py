"""Label-issue detection: the ranking finds flipped labels, the cleanlab
output follows cleanlab's conventions, ``gdw detect`` prints and fails well,
and a resumed run writes the same label_issues.csv."""

import csv

import numpy as np
import pytest

from gdw import detect
from gdw.cli import main
from gdw.train import TrainConfig, train

C, PER_CLASS, DIM = 4, 100, 8


@pytest.fixture(scope="module")
def blobs(tmp_path_factory):
    """Four well separated Gaussian blobs as an npz dataset (labels clean:
    the noise is injected by ``prepare`` so the true labels are known)."""
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1, (C, DIM)) * 2.5

    def draw(n):
        y = np.repeat(np.arange(C), n)
        return (centres[y] + rng.normal(0, 1, (len(y), DIM))).astype(np.float32), y

    x_train, y_train = draw(PER_CLASS)
    x_test, y_test = draw(20)
    path = tmp_path_factory.mktemp("data") / "blobs.npz"
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
             classes=np.array(["ant", "bee", "cat", "dog"]))
    return path


def _cfg(blobs, out, **kw):
    base = dict(dataset=f"npz:{blobs}", noise="flip:0.3", meta_per_class=10, method="gdw", epochs=6,
                batch_size=40, meta_batch_size=40, lr=0.1, seed=0, out=str(out), progress=False)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def gdw_run(blobs, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "gdw"
    train(_cfg(blobs, out), log=lambda *a: None)
    return out


def test_ranking_puts_flipped_labels_first(gdw_run):
    issues = detect.load_issues(gdw_run)
    noisy = issues.noisy_mask
    assert noisy is not None and 0.2 < noisy.mean() < 0.4
    m = detect.evaluate(issues)
    assert m["auroc"] > 0.9, m
    assert m["precision_at_k"] > 0.8, m
    # the suggested label is the true one for most of the flagged, truly flipped examples at the top
    k = int(noisy.sum())
    top = issues.order[:k]
    top = top[noisy[top] & (issues.suggested[top] != issues.given[top])]
    assert len(top) > 0.5 * k
    assert (issues.suggested[top] == issues.true[top]).mean() > 0.8
    assert m["suggestion_accuracy"] > 0.8
    # the run's own estimate of the number of issues is in the right range
    assert 0.5 * k <= issues.num_flagged <= 1.5 * k


def test_csv_schema_and_order(gdw_run, blobs):
    """label_issues.csv speaks the user's terms: ``index`` is the row of the
    user's npz arrays, labels are the user's label values."""
    with open(gdw_run / detect.CSV_NAME, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == detect.CSV_FIELDS
    scores = [float(r["score"]) for r in rows]
    assert scores == sorted(scores, reverse=True)
    split = np.load(gdw_run / "split.npz")
    user = np.load(blobs)
    names = ["ant", "bee", "cat", "dog"]
    assert sorted(int(r["index"]) for r in rows) == sorted(split["train_source_rows"].tolist())
    given = dict(zip(split["train_source_rows"].tolist(), split["train_labels"].tolist()))
    true = dict(zip(split["train_source_rows"].tolist(), split["train_true_labels"].tolist()))
    for r in rows:
        i = int(r["index"])
        assert r["given_label"] == names[given[i]] and names[true[i]] == names[int(user["y_train"][i])]
        assert r["is_label_issue"] == str(r["suggested_label"] != r["given_label"]).lower()
    assert sum(r["is_label_issue"] == "true" for r in rows) == detect.load_issues(gdw_run).num_flagged
    assert detect.read_label_issues(gdw_run)[0] == {**rows[0], "index": int(rows[0]["index"]),
                                                     "score": pytest.approx(float(rows[0]["score"]), rel=1e-5),
                                                     "is_label_issue": rows[0]["is_label_issue"] == "true"}
    ev = np.load(gdw_run / detect.EVIDENCE_NAME)
    assert ev["class_weight"].shape == (len(rows), C) and str(ev["method"]) == "gdw"


def test_auroc_matches_sklearn():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    y = rng.random(200) < 0.3
    s = np.round(rng.normal(size=200) + y, 1)  # with ties
    assert detect.auroc(s, y) == pytest.approx(roc_auc_score(y, s))


def _toy_issues():
    score = np.array([0.1, 0.9, 0.5, 0.8, 0.2, 0.7])
    given = np.array([0, 1, 2, 0, 1, 2])
    suggested = np.array([0, 2, 2, 1, 1, 0])
    return detect.Issues(index=np.arange(10, 16), given=given, suggested=suggested, score=score, true=None,
                         classes=["a", "b", "c"], method="gdw", run_dir=None)


def test_cleanlab_form_by_hand():
    issues = _toy_issues()
    assert issues.num_flagged == 3
    mask = detect.to_cleanlab(issues)  # default: the run's estimate, 3 issues
    assert mask.dtype == np.bool_ and mask.shape == (6,)
    assert mask.tolist() == [False, True, False, True, False, True]
    ranked = detect.to_cleanlab(issues, ranked=True)
    assert np.issubdtype(ranked.dtype, np.integer) and ranked.ndim == 1
    assert ranked.tolist() == [1, 3, 5]  # most severe first; positions, not original indices
    assert set(ranked) == set(np.flatnonzero(mask))
    assert detect.to_cleanlab(issues, num_issues=1, ranked=True).tolist() == [1]
    assert detect.to_cleanlab(issues, num_issues=0).sum() == 0


def test_cleanlab_form_matches_cleanlab(tmp_path):
    filt = pytest.importorskip("cleanlab.filter")
    rng = np.random.default_rng(0)
    n = 60
    labels = np.repeat(np.arange(3), n // 3)
    probs = np.full((n, 3), 0.05)
    probs[np.arange(n), labels] = 0.9
    wrong = rng.choice(n, 9, replace=False)
    probs[wrong] = 0.05
    probs[wrong, (labels[wrong] + 1) % 3] = 0.9
    theirs_mask = filt.find_label_issues(labels, probs)
    theirs_ranked = filt.find_label_issues(labels, probs, return_indices_ranked_by="self_confidence")
    issues = detect.Issues(index=np.arange(n), given=labels, suggested=probs.argmax(1),
                           score=1 - probs[np.arange(n), labels], true=None, classes=list("abc"), method="ce",
                           run_dir=None)
    ours_mask = detect.to_cleanlab(issues)
    ours_ranked = detect.to_cleanlab(issues, ranked=True)
    for ours, theirs in ((ours_mask, theirs_mask), (ours_ranked, theirs_ranked)):
        assert type(ours) is type(theirs) and ours.ndim == theirs.ndim == 1
        assert ours.dtype.kind == theirs.dtype.kind
    assert ours_mask.shape == theirs_mask.shape
    assert set(ours_ranked) == set(theirs_ranked) == set(wrong)  # the same examples on this easy toy
    # a saved mask round-trips through .npy unchanged
    np.save(tmp_path / "m.npy", ours_mask)
    assert np.array_equal(np.load(tmp_path / "m.npy"), theirs_mask)


def test_cli_detect_prints_table_and_metrics(gdw_run, capsys, tmp_path):
    assert main(["detect", str(gdw_run), "--top", "5"]) == 0
    out = capsys.readouterr().out
    assert "rank" in out and "given" in out and "suggested" in out and "score" in out
    assert any(name in out for name in ("ant", "bee", "cat", "dog"))  # class names from config.json
    assert "AUROC" in out and "precision@" in out and "recall@" in out
    table = out.split("----")[-1]
    assert len([line for line in out.splitlines() if line[:1].isdigit()]) == 5, table
    mask_file = tmp_path / "issues.npy"
    assert main(["detect", str(gdw_run), "--format", "cleanlab", "--output", str(mask_file), "--num-issues", "7"]) == 0
    mask = np.load(mask_file)
    assert mask.dtype == np.bool_ and mask.sum() == 7 and len(mask) == len(np.load(gdw_run / "split.npz")["train_index"])
    ranked_file = tmp_path / "ranked.npy"
    assert main(["detect", str(gdw_run), "--format", "cleanlab", "--output", str(ranked_file), "--ranked",
                 "--num-issues", "7"]) == 0
    assert set(np.load(ranked_file)) == set(np.flatnonzero(mask))


@pytest.mark.parametrize("argv", [
    ["detect", "/nonexistent/run"],
    ["detect", "."],  # a directory that is not a run
    ["detect", "RUN", "--method", "gdw"],  # both a run and training flags
    ["detect", "RUN", "--format", "cleanlab"],  # no --output
])
def test_cli_detect_user_errors_are_one_line(argv, gdw_run, capsys):
    argv = [str(gdw_run) if a == "RUN" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("gdw detect: error:") and err.count("\n") == 1


def test_cli_detect_run_without_label_issues(gdw_run, tmp_path, capsys):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(gdw_run, old)
    (old / detect.EVIDENCE_NAME).unlink()
    assert main(["detect", str(old)]) == 2
    err = capsys.readouterr().err
    assert detect.EVIDENCE_NAME in err and err.count("\n") == 1


def test_cli_detect_trains_first(blobs, tmp_path, capsys):
    out = tmp_path / "trained"
    assert main(["detect", "--dataset", f"npz:{blobs}", "--noise", "flip:0.3", "--meta-per-class", "10",
                 "--method", "mwnet", "--epochs", "2", "--batch-size", "40", "--no-progress", "--out", str(out)]) == 0
    assert (out / detect.CSV_NAME).is_file()
    assert "AUROC" in capsys.readouterr().out


@pytest.mark.parametrize("method,args", [("ce", {}), ("l2rw", {}), ("dm", {}), ("finetune", {"fraction": 0.9})])
def test_every_method_writes_label_issues(blobs, tmp_path, method, args):
    out = tmp_path / method
    train(_cfg(blobs, out, method=method, method_args=args, epochs=2), log=lambda *a: None)
    issues = detect.load_issues(out)
    assert np.isfinite(issues.score).all() and len(issues) == len(np.load(out / "split.npz")["train_index"])
    assert issues.score_name == detect.score_name(method)


def test_resumed_run_writes_the_same_label_issues(blobs, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    train(_cfg(blobs, full, epochs=4, method="mwnet"), log=lambda *a: None)

    def stop_after_two(line):
        if "epoch   2/4" in line:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_cfg(blobs, cut, epochs=4, method="mwnet"), log=stop_after_two)
    assert not (cut / detect.CSV_NAME).exists()
    train(_cfg(blobs, cut, epochs=4, method="mwnet", resume=True), log=lambda *a: None)
    assert (cut / detect.CSV_NAME).read_text() == (full / detect.CSV_NAME).read_text()
