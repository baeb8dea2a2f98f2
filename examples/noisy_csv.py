"""Write a small "own data" example: a CSV whose labels are partly wrong, a
hand-checked CSV, a CSV of new unlabelled rows and the same rows labelled.

    python examples/noisy_csv.py DIR

From scikit-learn's bundled digits (no download): 1,497 rows in random order
with string labels ("zero" … "nine"), 30% of them changed to another digit
(``DIR/data.csv``; the truth is kept apart in ``DIR/truth.csv`` only so that
the walkthrough in the README can check the results), 20 correct rows per
class (``DIR/checked.csv``), 100 unlabelled rows (``DIR/new.csv``) and the
same 100 rows with their correct labels (``DIR/test.csv``: a test set you
checked by hand, for ``--test``).
"""

import csv
import sys
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def write(path, x, labels=None):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([f"px{i}" for i in range(x.shape[1])] + (["digit"] if labels is not None else []))
        for i, row in enumerate(x):
            w.writerow([int(v) for v in row] + ([labels[i]] if labels is not None else []))


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    x, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(y))
    checked = np.concatenate([order[y[order] == c][:20] for c in range(10)])
    rest = np.setdiff1d(order, checked)
    rest = rest[rng.permutation(len(rest))]
    new, data = rest[:100], rest[100:]
    given = y[data].copy()
    wrong = rng.random(len(data)) < 0.3
    given[wrong] = (y[data][wrong] + rng.integers(1, 10, wrong.sum())) % 10
    write(out / "data.csv", x[data], [NAMES[k] for k in given])
    write(out / "checked.csv", x[checked], [NAMES[k] for k in y[checked]])
    write(out / "new.csv", x[new])
    write(out / "test.csv", x[new], [NAMES[k] for k in y[new]])
    with open(out / "truth.csv", "w", newline="") as f:
        csv.writer(f).writerows([["row", "true_digit"]] + [[i, NAMES[k]] for i, k in enumerate(y[data])])
    print(f"wrote {out}/data.csv ({len(data)} rows, {wrong.mean():.0%} wrong labels), checked.csv "
          f"({len(checked)} rows), new.csv and test.csv ({len(new)} rows), truth.csv")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "own-data"))
