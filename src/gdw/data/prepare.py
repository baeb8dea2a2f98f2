"""``prepare``: dataset + noise spec + imbalance spec -> train / meta / val / test splits.

Order of operations (fixed):

1. read the source; the train/test split is the published one, or a stratified split
   with the fixed seed 0 (digits, csv, folder) -- the same for every experiment seed;
   with ``test=`` that set is the test split and the source is not split at all;
2. meta set: a hand-checked labelled set given as ``meta=`` (all of it, or a balanced
   draw of ``meta_per_class`` per class), or the clean meta set shipped with the data
   (npz ``x_meta``, Clothing1M clean val / clean train), or else ``meta_per_class``
   examples of every class drawn by TRUE label from the training array (at least one
   example of each class must stay for training) and removed from it -- clean for
   benchmark datasets; for the user's own csv / folder / npz data the labels drawn by are
   the user's labels, which may be noisy (``record["warnings"]`` says so). Where the
   target prior (``target_prior``) resolves to ``"train"``, that draw holds
   ``meta_per_class * C`` examples in the training labels' shares instead;
3. validation set (``val_per_class``): drawn from the same source as the meta set (in
   the same way: per class, or in the training labels' shares),
   disjoint from it and from the training set; training examples with exactly the same
   inputs as a given meta/validation example are left out of training; in a test split drawn
   from the user's CSV file or image folder, so are test examples with the inputs of a
   meta/validation example (left out of the test split) and training examples with those
   of a test example;
4. imbalance: applied by TRUE class to what is left of the training array;
5. noise: synthetic noise injected into the true labels of the kept examples, or the
   real noisy labels (CIFAR-N label file, Clothing1M, npz ``y_train`` with
   ``y_train_true``) looked up for them.

Randomness: ``np.random.SeedSequence(seed).spawn(4)`` gives four independent generators
(meta draw, imbalance, noise, validation draw): the same seed gives the same split and
labels, and asking for a validation set leaves the meta set as it was. The steps below
fill in one namespace ``d`` of what is known so far.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from ..errors import UserError
from ..prior import resolve_target_prior
from .batches import mix_seed
from .builtin import CIFAR_N, read_cifar_n
from .labels import class_counts_check
from .noise import (apply_imbalance, apply_noise, parse_imbalance, parse_noise,
                    realised_noise_rate, realised_transition)
from .own import preprocess_record, read_examples, source_format
from .sources import FORMATS, load_source, resolve
from .split import Prepared, Split, _same_inputs, per_class_draw, share_counts


def _needs(k: int, n_val: int) -> tuple[str, str]:
    """``(what the meta and validation sets need per class, which option to lower)``."""
    if k and n_val:
        return (f"the meta set needs {k} and the validation set {n_val} per class", "meta_per_class or val_per_class")
    if k:
        return f"the meta set needs {k} per class", "meta_per_class"
    return f"the validation set needs {n_val} per class", "val_per_class"


def default_meta_per_class(labels: np.ndarray, num_classes: int) -> int:
    """100 clean examples per class when C <= 10, else 10 (the papers' CIFAR
    settings), but never more than a tenth of the smallest class, so a small
    dataset (digits: 14 per class) keeps most of its examples for training."""
    counts = np.bincount(labels[labels >= 0], minlength=num_classes)
    return max(1, min(100 if num_classes <= 10 else 10, int(counts.min()) // 10))


def _left_out(k: int, noun: str, of: str, split: str) -> str:
    """The warning that ``k`` rows (``noun``) with the inputs of an example of ``of`` were left out of ``split``."""
    return (f"{k} {noun}{'' if k == 1 else 's'} with exactly the inputs of an example of {of} "
            f"{'was' if k == 1 else 'were'} left out of the {split}.")


def prepare(dataset="digits", noise="none", imbalance="none", meta_per_class=None, seed=0, *,
            meta=None, val_per_class=0, test=None, data_root=None, download=False, label_column="label",
            test_fraction=0.2, image_size=None, stream=None, num_workers=0,
            mirror=None, features=None, ignore=None, text_column=None, encoder=None, text_dir=None,
            holdout=None, target_prior="auto", meta_draw="target") -> Prepared:
    """Read a dataset and build noisy/imbalanced training, clean meta (and validation) and
    test splits, in the order of the module docstring.

    Args:
        dataset: a registered format (:data:`gdw.data.FORMATS`): ``digits`` (default),
            ``mnist``, ``fashion-mnist``, ``cifar10``, ``cifar100``, ``clothing1m[:ROOT]``,
            ``folder:PATH``, ``npz:PATH``, ``csv:PATH``, or a bare folder/.npz/.csv path.
        noise: :func:`gdw.data.parse_noise` spec (``uniform:0.4``, ``cifar10n:worse``);
            ``none`` when the labels are already noisy.
        imbalance: ``none``, ``longtail:RHO`` or ``step:RHO`` (by true class).
        meta_per_class: clean meta examples per class; None: all of ``meta``, else the meta
            set shipped with the data, else :func:`default_meta_per_class`; 0: none.
        seed: non-negative int; the same seed gives the same split, labels and record.
        meta, test: your own labelled sets (``csv:``, ``folder:``, ``npz:``; labels matched
            to the training classes by name, preprocessed like the training data) used as
            the meta set / the test split; training rows with the same inputs are left out.
        val_per_class: validation examples per class, from the clean source (step 3).
        data_root, download, mirror: where official datasets are looked for / fetched from.
        label_column, test_fraction, features, ignore, text_column, encoder, text_dir: csv
            options (:func:`~gdw.data.files.read_csv`, :mod:`gdw.data.text`).
        image_size, stream, num_workers: image folders and Clothing1M; streamed loading.
        target_prior: ``"auto"``, ``"train"`` or ``"balanced"`` (:mod:`gdw.prior`); where
            it resolves to ``"train"``, the meta and validation sets drawn from the
            training data hold ``meta_per_class * C`` and ``val_per_class * C`` examples
            in the training labels' shares (each class at least 1) instead of as many
            of every class, so that the meta loss aims at the same prior as the
            predictions. A meta set or clean pool of your own is drawn per class.
        meta_draw: ``"target"`` (as above) or ``"per-class"``: the meta set drawn from
            the training data holds ``meta_per_class`` of every class whatever the
            target prior (the validation set still follows it).

    Returns a :class:`Prepared`; its ``record`` (JSON) says what was done, with
    ``warnings`` for the user, ``source_files``, ``meta_source`` / ``val_source`` and
    whether they are known to be clean. Raises UserError for any bad input.
    """
    nspec, ispec = parse_noise(noise), parse_imbalance(imbalance)
    _check_sizes(seed, meta_per_class, val_per_class)
    d = SimpleNamespace(dataset=dataset, N=int(val_per_class), meta_per_class=meta_per_class, fold=holdout,
                        target_setting=target_prior, imbalance=ispec.text, meta_draw=meta_draw)
    _read(d, nspec, test, meta, dict(data_root=data_root, download=download, mirror=mirror,
                                     label_column=label_column, image_size=image_size, stream=stream,
                                     features=features, ignore=ignore, text_column=text_column, encoder=encoder,
                                     text_dir=text_dir, test_fraction=0 if test is not None else test_fraction))
    rng_meta, rng_imb, rng_noise, rng_val = map(np.random.default_rng, np.random.SeedSequence(int(seed)).spawn(4))
    _labels(d, data_root)
    _clean_sets(d, rng_meta, rng_val)
    _leave_out_duplicates(d)
    # 4. imbalance by true class, 5. noise
    src, C = d.src, d.C
    train_pos = d.train_pos[apply_imbalance(d.true[d.train_pos], C, ispec, rng_imb)]
    true_tr = d.true[train_pos]
    noisy_tr, T = (d.observed[train_pos], None) if d.real_noise else apply_noise(true_tr, C, d.nspec, rng_noise)
    if not (src.clean or src.y_train_true is not None or d.nspec.kind != "none"):
        # the user's own labels, as they are: their truth is unknown, not equal to them
        true_tr = np.full_like(true_tr, -1)
    d.holdout = None
    if holdout is not None:  # a fold of the training rows, left out and predicted (gdw detect --folds)
        keep = fold_keep(noisy_tr, holdout, seed)
        d.holdout = (train_pos[~keep], noisy_tr[~keep], true_tr[~keep])
        train_pos, noisy_tr, true_tr = train_pos[keep], noisy_tr[keep], true_tr[keep]
    d.splits = s = _splits(d, train_pos, noisy_tr, true_tr, num_workers)
    d.clean = d.pool is not None or src.clean or src.y_train_true is not None
    return Prepared(s["train"], s["meta"], s["test"], list(src.classes), s["train"].input_shape,
                    _record(d, ispec, seed, noisy_tr, true_tr, T), val=s["val"], holdout=s["holdout"],
                    preprocess=preprocess_record(src, src.view, s["train"].input_shape, dataset, src.classes))


def fold_keep(labels: np.ndarray, holdout: str, seed: int) -> np.ndarray:
    """Mask of the rows kept for training when fold ``K`` of ``"K/N"`` is held out: the
    rows of each given label are dealt to N folds in an order fixed by ``seed``, so the N
    folds of one seed partition the training rows."""
    k, n = (int(v) for v in str(holdout).split("/"))
    order = np.random.default_rng([int(seed), 97]).permutation(len(labels))
    fold = np.empty(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        rows = order[labels[order] == c]
        fold[rows] = np.arange(len(rows)) % n
    return fold != k


def _check_sizes(seed, meta_per_class, val_per_class) -> None:
    mix_seed(seed)
    for name, v in (("meta_per_class", meta_per_class), ("val_per_class", val_per_class)):
        if v is None and name == "meta_per_class":
            continue
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise UserError(f"{name} must be a non-negative integer"
                            + (" or None" if name == "meta_per_class" else "") + f", got {v!r}")


def _read(d, nspec, test, meta, options: dict) -> None:
    """1. The source (``d.src``, ``d.C``, ``d.kind``), the given test and meta sets, the noise spec."""
    d.kind = resolve(d.dataset)[0]
    if nspec.kind in CIFAR_N and d.kind != CIFAR_N[nspec.kind][0]:
        raise UserError(f"noise {nspec.text!r} is for dataset {CIFAR_N[nspec.kind][0]!r}, not {d.dataset!r}")
    d.src = src = load_source(d.dataset, **options)
    d.C = len(src.classes)
    if d.C < 2:
        raise UserError(f"{d.dataset} has {'one class, ' + repr(str(src.classes[0])) if d.C else 'no labels'}: "
                        "a classifier needs examples of two or more classes"
                        + (" (is --label-column the column of labels?)" if d.kind == "csv" else ""))
    d.given_test = None if test is None else read_examples(
        test, source_format(src), src.classes, what="the test set", need_labels=True)
    d.nspec = parse_noise(nspec, d.C)
    d.given = None if meta is None else read_examples(
        meta, source_format(src), src.classes, what="the meta set", need_labels=True)


def _labels(d, data_root) -> None:
    """The observed and true training labels; the rows with a given test example's inputs."""
    src, nspec, n = d.src, d.nspec, len(d.src.y_train)
    d.observed = src.y_train
    d.true = src.y_train if src.y_train_true is None else src.y_train_true
    d.in_test = np.zeros(n, dtype=bool)  # training examples with the inputs of a given test example
    if d.given_test is not None:
        g = d.given_test
        d.in_test = _same_inputs(src.x_train, np.arange(n), g.store, np.arange(len(g.labels)))
        d.true = np.where(d.in_test, -1, d.true)  # never drawn for the meta / validation sets
    d.record_extra = {}
    if nspec.kind in CIFAR_N:
        d.observed, key, file = read_cifar_n(nspec.kind, nspec.key, nspec.path, data_root, n, d.C)
        d.record_extra = {"cifar_n_key": key, "cifar_n_file": file}
    elif src.y_train_true is not None and nspec.kind != "none":
        raise UserError(f"the training labels of {src.name} are already noisy; "
                        f"use noise='none' instead of {nspec.text!r}")
    d.real_noise = nspec.kind in CIFAR_N or src.y_train_true is not None


def _clean_source(d) -> None:
    """Where the meta and validation sets come from: ``d.pool`` (store, labels, origin)
    or None for the training set, ``d.source``, ``d.all_mode`` (all of it), ``d.what``."""
    src, given, mpc = d.src, d.given, d.meta_per_class
    if given is not None:
        d.pool, d.source, d.all_mode = (given.store, given.labels, given.origin), "given", mpc is None
        d.what = f"the meta set {given.name}"
    elif src.x_meta is not None and mpc is None:
        d.pool, d.source, d.all_mode = (src.x_meta, src.y_meta, src.origin("meta")), "provided", True
        d.what = "the provided clean set"
    elif src.meta_pool is not None or src.x_meta is not None:
        d.pool = (*src.meta_pool, src.origin("pool")) if src.meta_pool is not None else \
            (src.x_meta, src.y_meta, src.origin("meta"))
        d.source, d.all_mode, d.what = "provided clean pool", False, "the provided clean set"
    else:
        d.pool, d.source, d.all_mode, d.what = None, "train", False, "the training set"


def _clean_sets(d, rng_meta, rng_val) -> None:
    """2./3. The meta and validation draws (``d.meta_idx``, ``d.val_idx`` into ``d.store``)
    and the training positions left (``d.train_pos``)."""
    _clean_source(d)
    src, C, N, mpc = d.src, d.C, d.N, d.meta_per_class
    d.K = mpc if mpc is not None else default_meta_per_class(d.true, C)
    d.train_pos = np.flatnonzero(~d.in_test)
    d.meta_idx = d.val_idx = None
    if d.pool is None:
        k = int(d.K)
        d.store, d.labels, d.origin = src.x_train, d.true, src.origin("train")
        k, N = _draw_counts(d, k, N)
        d.meta_idx = per_class_draw(d.true, k, C, rng_meta) if np.any(k) else None
        d.val_idx = per_class_draw(d.true, N, C, rng_val, exclude=d.meta_idx) if np.any(N) else None
        taken = [i for i in (d.meta_idx, d.val_idx) if i is not None]
        if taken:
            d.train_pos = np.setdiff1d(d.train_pos, np.concatenate(taken))
        return
    d.store, d.labels, d.origin = d.pool
    labels = d.labels
    if d.all_mode:
        if d.given is not None or N:
            class_counts_check(labels, src.classes, N + 1, d.what, f"the validation set needs {N} per class plus "
                               "at least 1 left for the meta set; lower val_per_class" if N else
                               "every class of the training data needs at least 1 example in it")
        d.val_idx = per_class_draw(labels, N, C, rng_val) if N else None
        d.meta_idx = np.arange(len(labels)) if d.val_idx is None else np.setdiff1d(np.arange(len(labels)), d.val_idx)
    else:
        k = int(d.K) if mpc != 0 else 0
        if k + N:
            need, lower = _needs(k, N)
            class_counts_check(labels, src.classes, k + N, d.what, f"{need}; lower {lower}")
        d.meta_idx = per_class_draw(labels, k, C, rng_meta) if k else None
        d.val_idx = per_class_draw(labels, N, C, rng_val, exclude=d.meta_idx) if N else None
    if mpc == 0:
        d.meta_idx = None


def _draw_counts(d, k: int, n_val: int):
    """The meta and validation draws from the training data, per class: ``k`` and
    ``n_val`` of every class, or, where the target prior resolves to ``"train"``,
    (C,) counts of ``k * C`` and ``n_val * C`` in the training labels' shares
    (``d.draw_prior`` says which; ``d.meta_draw_prior`` is ``"balanced"`` where
    ``meta_draw="per-class"`` keeps the meta draw per class). Raises UserError
    where a class has too few."""
    src, C = d.src, d.C
    labels = d.true[d.train_pos]
    counts = np.bincount(labels[labels >= 0], minlength=C)
    d.draw_prior = d.meta_draw_prior = resolve_target_prior(d.target_setting, counts, d.imbalance)
    if d.draw_prior == "balanced" or not k + n_val or counts.min() == 0:  # a class without examples: say so
        if k + n_val:
            need, lower = _needs(k, n_val)
            class_counts_check(d.true, src.classes, k + n_val + 1, d.what,
                               f"{need} plus at least 1 left for training; lower {lower}")
        return k, n_val
    ks, ns = share_counts(counts, k * C), share_counts(counts, n_val * C)
    if d.meta_draw == "per-class":
        ks, d.meta_draw_prior = np.full(C, k, dtype=np.int64), "balanced"
    short = np.flatnonzero(counts < ks + ns + 1)
    if short.size:
        c = int(short[0])
        raise UserError(f"class {c} ({src.classes[c]!r}) has {counts[c]} examples in {d.what}, but the meta and "
                        f"validation sets drawn in the training labels' shares need {ks[c]} and {ns[c]} of it plus "
                        "at least 1 left for training; lower meta_per_class or val_per_class")
    return ks, ns


def _leave_out_duplicates(d) -> None:
    """Training rows with the inputs of a clean (meta / validation) example, and, in a test
    split drawn from the user's file, test rows with them or with a training row's."""
    src, train_pos = d.src, d.train_pos
    d.removed = 0
    d.used = [i for i in (d.meta_idx, d.val_idx) if i is not None]
    if d.pool is not None and d.used:
        other = np.concatenate(d.used)
        if d.given is not None:
            drop = _same_inputs(src.x_train, train_pos, d.store, other)
        elif hasattr(d.store, "paths") and hasattr(src.x_train, "paths"):
            taken = {d.store.paths[i] for i in other}  # e.g. Clothing1M: clean keys also noisy
            drop = np.array([src.x_train.paths[i] in taken for i in train_pos], dtype=bool)
        else:
            drop = np.zeros(len(train_pos), dtype=bool)
        d.removed = int(drop.sum()) if d.given is not None else 0
        train_pos = train_pos[~drop]
    test_pos, d.out_of_test = np.arange(len(src.y_test)), 0
    drawn = (d.given_test is None and FORMATS.get(d.kind).user_files
             and src.notes.get("test_split", "").startswith("stratified"))
    if drawn:  # a test split drawn from the user's file:
        if d.pool is not None and d.used:  # not the inputs of a clean example
            dup = _same_inputs(src.x_test, test_pos, d.store, np.concatenate(d.used))
            test_pos, d.out_of_test = test_pos[~dup], int(dup.sum())
        dup = _same_inputs(src.x_train, train_pos, src.x_test, test_pos)  # nor trained on
        d.in_test[train_pos[dup]] = True
        train_pos = train_pos[~dup]
    empty = "training" if not len(train_pos) else "test" if d.out_of_test and not len(test_pos) else None
    if empty:
        raise UserError(f"no {empty} examples are left: each has exactly the inputs of an example of another split "
                        "(meta, validation or test); --meta and --test must be examples apart from the training "
                        "data, not the data file itself")
    d.train_pos, d.test_pos = train_pos, test_pos


def _splits(d, train_pos, noisy_tr, true_tr, num_workers) -> dict:
    """The :class:`Split` objects: ``train``, ``meta``, ``val`` (None when absent), ``test``."""
    src = d.src

    def make(name, st, pos, y, yt, org, **kw):
        return Split(name, st, pos, y, yt, src.view, num_workers=num_workers, source_rows=org.rows_of(pos),
                     source_paths=org.paths_of(pos), source_file=org.file, **kw)

    out = {"train": make("train", src.x_train, train_pos, noisy_tr, true_tr, src.origin("train"),
                         augment=src.augment), "meta": None, "val": None}
    for name, idx in (("meta", d.meta_idx), ("val", d.val_idx)):
        if idx is not None:
            out[name] = make(name, d.store, idx, d.labels[idx], d.labels[idx], d.origin)
    out["holdout"] = None if d.holdout is None else make("holdout", src.x_train, *d.holdout, src.origin("train"))
    if d.given_test is None:
        pos = d.test_pos
        out["test"] = make("test", src.x_test, pos, src.y_test[pos], src.y_test[pos], src.origin("test"))
    else:
        g = d.given_test
        out["test"] = make("test", g.store, np.arange(len(g.labels)), g.labels, g.labels, g.origin)
    return out


def _warnings(d) -> list:
    """Sentences for the user: sets drawn from labels not known to be clean, rows left out."""
    src, given, given_test, warnings = d.src, d.given, d.given_test, []
    drawn = [s for s, x in (("meta set", d.splits["meta"]), ("validation set", d.splits["val"])) if x is not None]
    if drawn and not d.clean:
        sets = " and the ".join(drawn)
        it = "it" if len(drawn) == 1 else "they"
        warnings.append(
            f"The {sets} {'was' if len(drawn) == 1 else 'were'} drawn from the labels of "
            f"{src.name}, which are not known to be clean, so {it} may hold label errors; "
            f"pass a hand-checked labelled set as meta (csv:PATH, folder:PATH or npz:PATH) "
            f"to have clean ones.")
    if d.removed:
        warnings.append(_left_out(d.removed, "training example", given.name, "training set"))
    if d.in_test.any():
        test_set = f"the test set {given_test.name if given_test else 'split'}"
        warnings.append(_left_out(int(d.in_test.sum()), "training example", test_set, "training set"))
    if d.out_of_test:
        clean_set = given.name if given else "the clean set"
        warnings.append(_left_out(d.out_of_test, "test example", clean_set, "test split"))
    if given is not None and not d.used:
        warnings.append(f"The meta set {given.name} was not used (meta_per_class=0, val_per_class=0).")
    return warnings


def _record(d, ispec, seed, noisy_tr, true_tr, T) -> dict:
    """The JSON record of what prepare() did (``Prepared.record``)."""
    src, C, given, given_test = d.src, d.C, d.given, d.given_test
    train, meta_split, val_split, test = (d.splits[k] for k in ("train", "meta", "val", "test"))
    known = true_tr >= 0

    def counts_of(split):
        return np.bincount(split.labels.numpy(), minlength=C).tolist() if split is not None else [0] * C

    counts = {"train_noisy": np.bincount(noisy_tr, minlength=C).tolist(),
              "train_true": np.bincount(true_tr[known], minlength=C).tolist(),
              "meta": counts_of(meta_split), "val": counts_of(val_split), "test": counts_of(test)}
    order = (("test set given" if given_test is not None else "test split (fixed)") + " -> meta (" + {
        "given": "given", "provided": "provided", "provided clean pool": "provided pool",
        "train": "by true class" if d.clean else "by the given labels"}[d.source]
        + (") -> val (same source" if val_split is not None else "") + ") -> imbalance (by true class) -> noise")
    return {
        "dataset": str(d.dataset), "source": src.name, "noise": d.nspec.text,
        "imbalance": ispec.text, "seed": int(seed),
        "meta_per_class": 0 if meta_split is None else (None if d.all_mode else int(d.K)),
        # "train": the meta / validation draw from the training data follows its labels' shares
        "meta_draw_prior": getattr(d, "meta_draw_prior", None) if d.source == "train" else None,
        "val_draw_prior": getattr(d, "draw_prior", None) if d.source == "train" else None,
        "meta_source": "none" if meta_split is None else d.source, "meta": None if given is None else given.name,
        "meta_known_clean": None if meta_split is None else bool(d.clean),
        "val_per_class": d.N, "val_source": "none" if val_split is None else d.source,
        "val_known_clean": None if val_split is None else bool(d.clean),
        "num_classes": C, "classes": list(src.classes), "input_shape": list(train.input_shape),
        "n_train": len(train), "n_meta": 0 if meta_split is None else len(meta_split),
        "n_val": 0 if val_split is None else len(val_split),
        "n_test": len(test), "n_train_true_unknown": int((~known).sum()),
        "n_train_left_out_as_in_meta": d.removed,
        "test": None if given_test is None else given_test.name,
        # a test split drawn from the user's own labels is as noisy as they are; --test is the user's checked set
        "test_known_clean": given_test is not None or not FORMATS.get(d.kind).user_files,
        "n_train_left_out_as_in_test": int(d.in_test.sum()), "n_test_left_out_as_in_meta": d.out_of_test,
        "realised_noise_rate": realised_noise_rate(true_tr, noisy_tr) if known.any() else None,
        "requested_transition": None if T is None else T.tolist(),
        "realised_transition": realised_transition(true_tr, noisy_tr, C).tolist() if known.any() else None,
        "counts": counts, "order": order,
        "source_files": {k: getattr(d.splits[k], "source_file", None) for k in ("train", "meta", "val", "test")},
        "warnings": _warnings(d),
        "files": list(src.files), **src.notes, **d.record_extra,
        **({} if d.fold is None else {"holdout": d.fold, "n_holdout": len(d.splits["holdout"])}),
    }
