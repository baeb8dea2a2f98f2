"""gdw.find_label_issues: the noise estimate against simulations whose truth
is known, hand-worked flagged sets, and the README's own-loop example."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch

import gdw
from gdw.issues import noise_matrix


def simulate(n, T, M, rng, soft=0.6):
    """n rows: true classes uniform, given labels from the noise matrix T
    (rows: true class), the model's predicted class from its confusion M
    (rows: true class, independent of the given label); probabilities put
    ``soft`` on the predicted class and spread the rest evenly."""
    C = len(T)
    true = rng.integers(0, C, n)
    given = np.array([rng.choice(C, p=T[t]) for t in true])
    pred = np.array([rng.choice(C, p=M[t]) for t in true])
    probs = np.full((n, C), (1 - soft) / (C - 1))
    probs[np.arange(n), pred] = soft
    return true, given, probs


T = np.array([[0.8, 0.2, 0.0], [0.0, 0.9, 0.1], [0.3, 0.0, 0.7]])  # 20% / 10% / 30% wrong: 20% overall
M = np.array([[0.85, 0.1, 0.05], [0.1, 0.8, 0.1], [0.05, 0.05, 0.9]])  # the model's own mistakes


def test_with_a_clean_set_the_estimate_corrects_for_the_models_mistakes():
    rng = np.random.default_rng(0)
    true, given, probs = simulate(30000, T, M, rng)
    clean_true, _, clean_probs = simulate(6000, np.eye(3), M, rng)
    found = gdw.find_label_issues(given, probs, clean_labels=clean_true, clean_pred_probs=clean_probs, bootstrap=50)
    truth = float((given != true).mean())
    assert found.noise_rate == pytest.approx(truth, abs=0.01)
    lo, hi = found.noise_interval
    assert lo <= truth <= hi and hi - lo < 0.03
    # the pairs: N[i, j] = rows with given i and true j, against the simulation's own counts
    counted = np.zeros((3, 3))
    np.add.at(counted, (given, true), 1)
    np.testing.assert_allclose(found.noise_matrix, counted, atol=0.02 * len(given))
    # without the clean set every disagreement counts: the estimate is the disagreement share
    plain = gdw.find_label_issues(given, probs, bootstrap=0)
    assert plain.noise_rate == pytest.approx(float((probs.argmax(1) != given).mean()), abs=1e-12)
    assert plain.noise_rate > truth + 0.05


def test_noise_matrix_by_hand():
    """Two classes, a model that is always right on clean rows (M = I):
    N̂ is the count of (given, predicted) pairs."""
    labels = np.array([0, 0, 0, 1, 1])
    pred = np.array([0, 0, 1, 1, 0])
    np.testing.assert_array_equal(noise_matrix(labels, pred, 2), [[2, 1], [1, 1]])
    # with a clean set saying the model calls half of class 1 "0" and is right on class 0:
    # M = [[1, 0], [.5, .5]], N̂ = C M⁻¹ = [[2, 1], [1, 1]] [[1, 0], [-1, 2]] = [[1, 2], [0, 2]]
    got = noise_matrix(labels, pred, 2, clean_labels=np.array([0, 0, 1, 1]), clean_pred=np.array([0, 0, 0, 1]))
    np.testing.assert_allclose(got, [[1, 2], [0, 2]], atol=1e-12)


def test_flagged_rows_follow_the_estimate_within_each_class():
    """Class 0 has one disagreeing row among three, class 1 two among three:
    the least trusted one of class 0 and two of class 1 are flagged, first in
    the order, with the other likely class suggested."""
    labels = np.array([0, 0, 0, 1, 1, 1])
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8], [0.7, 0.3], [0.55, 0.45]])
    found = gdw.find_label_issues(labels, probs, class_names=["cat", "dog"], bootstrap=0)
    assert found.flagged.tolist() == [False, False, True, False, True, True]
    assert found.noise_rate == pytest.approx(3 / 6)
    assert found.order.tolist() == [2, 4, 5, 1, 3, 0]  # flagged by score (ties in row order), then the rest
    rows = found.rows(top=2, row_ids=[10, 11, 12, 13, 14, 15])
    odds = round(float(np.log(0.7 / 0.3)), 6)  # the score: log-odds of the other class against the given one
    assert rows == [{"row": 12, "given_label": "cat", "suggested_label": "dog", "score": odds, "flagged": True},
                    {"row": 14, "given_label": "dog", "suggested_label": "cat", "score": odds, "flagged": True}]
    assert found.pairs() == [("dog", "cat", 2.0), ("cat", "dog", 1.0)]
    top = gdw.find_label_issues(labels, probs, num_issues=1, bootstrap=0)
    assert top.flagged.tolist() == [False, False, True, False, False, False]  # the first of the two at 0.7 : 0.3


@pytest.mark.parametrize("bad, match", [
    (dict(labels=[0, 1], pred_probs=np.ones((3, 2)) / 2), "same n"),
    (dict(labels=[0, 2], pred_probs=np.ones((2, 2)) / 2), "whole numbers"),
    (dict(labels=[0.5, 1], pred_probs=np.ones((2, 2)) / 2), "whole numbers"),
    (dict(labels=[0, 1], pred_probs=[[np.nan, 1], [0, 1]]), "finite"),
    (dict(labels=[0, 1], pred_probs=np.ones((2, 2)) / 2, clean_labels=[0]), "both"),
    (dict(labels=[0, 1], pred_probs=np.ones((2, 2)) / 2, num_issues=3), "num_issues"),
    (dict(labels=[0, 1], pred_probs=np.ones((2, 2)) / 2, class_names=["a"]), "class names"),
])
def test_bad_inputs_are_user_errors(bad, match):
    with pytest.raises(gdw.UserError, match=match):
        gdw.find_label_issues(**bad)


def test_the_readme_label_issue_loop_runs_and_finds_the_flipped_rows():
    """The README's own-loop example, executed as written: two well separated
    clusters with 15 of 100 labels flipped and a clean meta set; the
    recorder's evidence and find_label_issues find the flipped rows."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index("## Which labels are wrong?"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    g = torch.Generator().manual_seed(0)
    true = torch.arange(100) % 2
    x = torch.randn(100, 4, generator=g) + 3 * true[:, None].float()
    labels = true.clone()
    labels[:15] = 1 - labels[:15]
    xm = torch.randn(40, 4, generator=g) + 3 * (torch.arange(40) % 2)[:, None].float()
    ym = torch.arange(40) % 2
    train_loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, labels, torch.arange(100)),
                                               batch_size=20, shuffle=True, generator=g)
    meta_loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xm, ym), batch_size=20)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    printed = []
    scope = {"gdw": gdw, "model": model, "optimizer": optimizer, "epochs": 15, "train_loader": train_loader,
             "meta_loader": meta_loader, "train_labels": labels, "print": printed.append}
    exec(code, scope)
    issues = scope["issues"]
    wrong = np.arange(100) < 15
    assert wrong[issues.flagged].mean() >= 0.8 and issues.flagged[wrong].mean() >= 0.8
    assert printed[0].endswith(")") and "wrong" in printed[0]
    assert [r["flagged"] for r in printed[1]][:1] == [True]


def test_label_score_by_hand():
    """log p_k − log p_y, k the likeliest other class: a row whose missing
    probability sits on one rival ranks above one whose probability is spread,
    though both give their label 0.4; on two classes it orders rows as 1 − p_y."""
    probs = np.array([[0.4, 0.6, 0.0], [0.4, 0.3, 0.3], [0.1, 0.2, 0.7], [0.0, 1.0, 0.0]])
    labels = np.array([0, 0, 2, 0])
    got = gdw.label_score(probs, labels)
    want = [np.log(0.6 / 0.4), np.log(0.3 / 0.4), np.log(0.2 / 0.7), np.log(1.0 / gdw.issues.TINY)]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    two = np.array([[0.9, 0.1], [0.2, 0.8], [0.55, 0.45], [0.5, 0.5]])
    y = np.array([0, 0, 1, 1])
    np.testing.assert_array_equal(np.argsort(-gdw.label_score(two, y), kind="stable"),
                                  np.argsort(-(1 - two[np.arange(4), y]), kind="stable"))
    np.testing.assert_allclose(gdw.label_score(2 * probs[:3], labels[:3]), got[:3], rtol=1e-12)  # a ratio: scale-free
    found = gdw.find_label_issues(labels, probs, bootstrap=0)
    np.testing.assert_allclose(found.score, got, rtol=1e-12)
    with pytest.raises(gdw.UserError, match="two classes"):
        gdw.find_label_issues(np.zeros(3, int), np.ones((3, 1)))


def test_interval_is_the_basic_bootstrap():
    """(2r − q97.5, 2r − q2.5) over resamples of the rows and of the clean rows,
    drawn in that order from the seed; the resampled estimates computed here
    from noise_matrix directly."""
    rng = np.random.default_rng(3)
    n, m, C = 300, 40, 3
    labels, clean = rng.integers(0, C, n), rng.integers(0, C, m)
    probs, cprobs = rng.dirichlet(np.ones(C), n), rng.dirichlet(np.ones(C), m)
    probs[np.arange(n), labels] += 0.8  # mostly agreeing with the labels
    cprobs[np.arange(m), clean] += 0.8
    found = gdw.find_label_issues(labels, probs, clean_labels=clean, clean_pred_probs=cprobs, bootstrap=50, seed=7)

    def rate(rows, crows):
        N = noise_matrix(labels[rows], probs.argmax(1)[rows], C, clean[crows], cprobs.argmax(1)[crows])
        return 1 - np.trace(N) / N.sum()
    r = rate(np.arange(n), np.arange(m))
    draw = np.random.default_rng(7)
    rates = [rate(draw.integers(0, n, n), draw.integers(0, m, m)) for _ in range(50)]
    lo, hi = np.percentile(rates, [2.5, 97.5])
    assert found.noise_rate == pytest.approx(r, abs=1e-12)
    np.testing.assert_allclose(found.noise_interval, (max(2 * r - hi, 0), 2 * r - lo), atol=1e-12)


def test_estimate_caveat_by_hand():
    """The caveat where rows the model never trained on disagree with more of
    their labels than the clean set's error e plus the estimate (plus the
    margin) explain; none where they do not, or a set is missing."""
    from gdw.issues import estimate_caveat

    def probs(pred, C=2):
        return np.eye(C)[np.asarray(pred)] * 0.8 + 0.1

    clean = np.array([0, 1] * 50)  # 100 clean rows
    right, one_wrong = probs(clean), probs(np.r_[1 - clean[:1], clean[1:]])  # e = 0 and e = 0.01
    held = np.array([0, 1] * 50)  # 100 held-out rows, 30 of them predicted against their label
    held_pred = probs(np.r_[1 - held[:30], held[30:]])
    # 0.30 > 0 + 0.19 + 0.05: the caveat, with the numbers
    text = estimate_caveat(0.19, clean, right, held, held_pred)
    assert text is not None and "errs on 0% of the 100 clean" in text and "30% of the labels of 100 rows" in text
    assert "19.0% estimate" in text
    assert estimate_caveat(0.19, clean, one_wrong, held, held_pred) is not None  # 0.30 > 0.01 + 0.24
    assert estimate_caveat(0.25, clean, one_wrong, held, held_pred) is None  # 0.30 ≤ 0.01 + 0.25 + 0.05
    assert estimate_caveat(0.25, clean, right, held, held_pred) is None  # 0.30 ≤ 0 + 0.25 + 0.05, at the bound
    assert estimate_caveat(0.19, clean, right, held, held_pred, margin=0.2) is None
    # no clean set (M = I): e = 0, and the reason says so
    plain = estimate_caveat(0.19, None, None, held, held_pred)
    assert plain.startswith("no clean set corrected it, and the model disagrees with 30% of the labels of 100 rows")
    assert estimate_caveat(0.25, None, None, held, held_pred) is None
    assert estimate_caveat(0.19, clean, right, None, None) is None
    assert estimate_caveat(0.19, clean, right, held[:0], held_pred[:0]) is None


def test_switch_caveat_by_hand():
    """gdw.recorder.switch_caveat: a sentence with the epoch (1-based) and both
    numbers where the count is below the check's estimate; None otherwise."""
    from gdw.recorder import switch_caveat

    text = switch_caveat(0.004, {"epoch": 8, "estimate": 0.0305})
    assert "trained plainly from epoch 9 on" in text and "estimated 3.0% wrong labels" in text
    assert "this count (0.4%) is probably low" in text
    assert switch_caveat(0.04, {"epoch": 8, "estimate": 0.0305}) is None
    assert switch_caveat(0.0305, {"epoch": 8, "estimate": 0.0305}) is None
    assert switch_caveat(0.004, None) is None
