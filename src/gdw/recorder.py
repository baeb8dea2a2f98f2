"""The label-issue evidence of a training run: a callback of ``gdw.fit``.

:class:`LabelIssueRecorder` averages, for every training example over the
epochs of a run, the model's probabilities (and the method's weights) from
the forward passes that trained on it, and at the end writes
``label_evidence.npz`` and ``label_issues.csv`` (:mod:`gdw.detect` reads
them; :func:`gdw.find_label_issues` decides how many are flagged).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .callbacks import Callback
from .detect import CSV_NAME, EVIDENCE_NAME, WINDOW, issues_table, score_name, write_csv
from .errors import UserError
from .fit import predict_proba
from .issues import estimate_caveat, find_label_issues, flag_per_class, label_score, most_likely_other


class LabelIssueRecorder(Callback):
    """Per-example sums of trust, class weights and probabilities over the
    epochs of a training run.

    The training loop calls :meth:`update` after every step and
    :meth:`end_epoch` after every epoch (on every rank: under data-parallel
    training it sums the epoch's statistics over the ranks), puts
    :meth:`state_dict` into its checkpoint and finally calls :meth:`write`.

    Args:
        n: number of training examples (positions ``0..n-1`` as yielded by
            ``Split.batches``).
        num_classes: C.
        epochs: total epochs of the run.
        window: None (default): every epoch counts; k: only the last
            ``min(k, epochs)`` epochs.
        device: where the sums live (the training device; default the CPU).
        state: a :meth:`state_dict` to continue from (resumed runs).
    """

    name = "label_issues"

    def __init__(self, n: int, num_classes: int, epochs: int, device="cpu", *, window: Optional[int] = WINDOW,
                 state: Optional[dict] = None):
        self.n, self.num_classes = int(n), int(num_classes)
        self.first_epoch = 0 if window is None else max(0, int(epochs) - int(window))
        self.device = torch.device(device)
        self.epoch_sums: dict[str, torch.Tensor] = {}  # the current epoch (this rank's share)
        self.sums: dict[str, torch.Tensor] = {}  # the window so far (all ranks)
        self.epochs_seen: list[int] = []
        self.last_epoch: dict[str, torch.Tensor] = {}  # the sums of the last epoch that trained on examples
        self.switched: Optional[dict] = None  # {"epoch", "estimate"}: where FinetuneCheck switched to plain training
        if state:
            self.load_state_dict(state)

    def epoch_means(self) -> dict:
        """Means over the last epoch that trained on examples (tensors, position
        order; rows never seen are 0), with ``count``; empty before the first epoch."""
        return _means(self.last_epoch) if self.last_epoch else {}

    def _add(self, name: str, pos: torch.Tensor, values: torch.Tensor) -> None:
        if name not in self.epoch_sums:
            shape = (self.n, self.num_classes) if name in ("prob", "class_weight") else (self.n,)
            self.epoch_sums[name] = torch.zeros(shape, device=self.device)
        self.epoch_sums[name].index_add_(0, pos, values.float())

    def update(self, epoch: int, pos: torch.Tensor, stats) -> None:
        """Add one training step's ``Stats`` for the examples at positions ``pos``
        (steps that trained on the meta batch instead are ignored)."""
        if getattr(stats, "trained_on", "train") != "train":
            return
        with torch.no_grad():
            self._add("count", pos, torch.ones(len(pos), device=self.device))
            self._add("prob", pos, torch.softmax(stats.logits.float(), 1))
            if stats.trust is not None:
                self._add("trust", pos, stats.trust)
            if stats.weights.ndim == 2:
                self._add("class_weight", pos, stats.weights)
            if stats.instance_weights is not None:
                self._add("instance_weight", pos, stats.instance_weights)

    # the training loop's callback hooks (gdw.fit)
    def on_step(self, state, pos, stats) -> None:
        self.update(state.epoch, pos, stats)

    def on_epoch_end(self, state) -> None:
        self.end_epoch(state.epoch, state.comm)

    def end_epoch(self, epoch: int, comm=None) -> None:
        """Fold the finished epoch into the window sums; ``comm`` (with a
        ``sum_(tensors)`` all-reduce, e.g. :class:`gdw.distributed.Comm`)
        combines the ranks' shares first. Collective: call it on every rank."""
        self.epoch_sums.setdefault("count", torch.zeros(self.n, device=self.device))
        names = sorted(self.epoch_sums)
        if comm is not None:
            comm.sum_([self.epoch_sums[k] for k in names])
        self.last_epoch = self.epoch_sums if bool(self.epoch_sums["count"].any()) else self.last_epoch
        if epoch < self.first_epoch:
            self.epoch_sums = {}
            return
        for k in names:
            self.sums[k] = self.sums.get(k, 0) + self.epoch_sums[k]  # a new tensor: epoch_sums stays last_epoch
        self.epoch_sums = {}
        self.epochs_seen.append(int(epoch))

    def state_dict(self) -> dict:
        return {"first_epoch": self.first_epoch, "epochs_seen": list(self.epochs_seen),
                "sums": {k: v.detach().cpu() for k, v in self.sums.items()},
                "last_epoch": {k: v.detach().cpu() for k, v in self.last_epoch.items()}, "switched": self.switched}

    def load_state_dict(self, state: dict) -> None:
        self.epochs_seen = list(state.get("epochs_seen", []))
        self.sums = {k: v.to(self.device) for k, v in state.get("sums", {}).items()}
        self.last_epoch = {k: v.to(self.device) for k, v in state.get("last_epoch", {}).items()}
        self.switched = state.get("switched")
        self.epoch_sums = {}

    def evidence(self) -> dict:
        """Window means (numpy, position order); ``count`` says in how many
        steps each example was seen (0: no evidence)."""
        if "count" not in self.sums:
            return {"count": np.zeros(self.n, dtype=np.int64)}
        means = _means(self.sums)
        return {"count": means.pop("count").cpu().numpy().astype(np.int64),
                **{k: v.cpu().numpy().astype(np.float32) for k, v in means.items()}}

    def held_out(self, data, model, batch_size: int = 500) -> dict:
        """The final model's probabilities (``prob``) and the labels
        (``given``) of the splits it did not train on (meta, val, test, holdout;
        those a run has), e.g. ``{"val": {"prob": (m, C), "given": (m,)}}``."""
        if model is None:
            return {}
        out = {}
        for name in ("meta", "val", "test", "holdout"):
            split = getattr(data, name, None)
            if split is not None and len(split):
                out[name] = {"prob": predict_proba(model, split, batch_size, self.device).cpu().numpy(),
                             "given": split.labels.numpy()}
        if "holdout" in out:  # the user's rows and, where known, the true labels of the fold left out
            rows, _ = source_of(data.holdout)
            true = data.holdout.true_labels
            out["holdout"].update(source_rows=rows, true=np.full(len(rows), -1) if true is None else true.numpy())
        return out

    def write(self, out, data, method: str, *, model=None, batch_size: int = 500, fits_meta: bool = False) -> Path:
        """Score every training example (and the rows of a test split drawn
        from the user's data, :func:`score_test_split`) and write
        ``label_evidence.npz`` and ``label_issues.csv`` (:func:`_table`) into
        the run directory ``out``. ``fits_meta``: the method trained
        towards the meta set (``Method.needs_meta``), so the final model's
        mistakes on it stand for its mistakes on clean training rows and
        correct the estimate of how many labels are wrong. Where the
        held-out splits or a switch to plain training show the estimate to
        be rough, ``estimated_noise_caveat`` (in :attr:`noise`, which goes
        to summary.json, and ``noise_caveat`` in the npz) says why.

        ``data``: the run's :class:`gdw.data.Prepared` (its training split
        and class names). ``model``: the final model; it predicts the
        splits it did not train on (:meth:`held_out`, saved as
        ``meta_prob``, ``val_prob``, ``test_prob`` with their labels) and
        the training examples that got no evidence (``finetune`` spends its
        last epochs on the meta set).
        """
        out, train_split = Path(out), data.train
        ev = self.evidence()
        missing = ev["count"] == 0
        if missing.any():
            if model is None:
                raise UserError("no training statistics were recorded in the last epochs; cannot rank labels")
            prob = ev.get("prob", np.zeros((self.n, self.num_classes), np.float32))
            prob[missing] = predict_proba(model, train_split, batch_size, self.device).cpu().numpy()[missing]
            ev["prob"] = prob
            if "trust" in ev:
                ev["trust"][missing] = np.nan
        given = train_split.labels.numpy()
        held = self.held_out(data, model, batch_size)
        score = label_score(ev["prob"], given)  # higher, more suspect
        # the model's own mistakes where labels are right: on the meta set, which a meta method fits about as
        # well as the clean training rows (docs/algorithms.md, 5c)
        meta = held.get("meta") if fits_meta else None
        clean = {"clean_labels": meta["given"], "clean_pred_probs": meta["prob"]} if meta is not None else {}
        found = find_label_issues(given, ev["prob"], **clean)
        self.noise = {"estimated_noise_rate": found.noise_rate, "estimated_noise_interval": list(found.noise_interval)}
        caveat = self._caveat(found.noise_rate, meta, held)
        if caveat:
            self.noise["estimated_noise_caveat"] = caveat
        suggested = np.where(found.flagged, most_likely_other(ev["prob"], given), given).astype(np.int64)
        rows, paths = source_of(train_split)
        test = score_test_split(data, held.get("test"), found, given)
        np.savez(out / EVIDENCE_NAME, **{f"test_{k}": v for k, v in test.items()}, method=np.array(method),
                 score_name=np.array(score_name(method)), noise_rate=found.noise_rate,
                 noise_interval=np.array(found.noise_interval), noise_matrix=found.noise_matrix,
                 noise_caveat=np.array(caveat),
                 **{f"{name}_{k}": v for name, part in held.items() for k, v in part.items()},
                 epochs=np.array(self.epochs_seen, dtype=np.int64), given=given, index=train_split.index.numpy(),
                 suggested=suggested, score=score, source_rows=rows,
                 source_paths=np.array(paths if paths is not None else [], dtype=str),
                 **{k: (v.astype(np.float16) if v.ndim == 2 else v) for k, v in ev.items()})
        return write_csv(out / CSV_NAME, _table(data, given, suggested, score, rows, paths, held, test))

    def _caveat(self, rate: float, meta: Optional[dict], held: dict) -> str:
        """Why the estimate ``rate`` is rough, with what to do about it, or "" (:func:`gdw.issues.estimate_caveat`
        on the held-out splits, corrected by ``meta`` where it corrected the estimate; :func:`switch_caveat`)."""
        unseen = [held[k] for k in ("val", "test") if k in held]  # rows the final model never trained on
        held_labels, held_probs = ((np.concatenate([u["given"] for u in unseen]),
                                    np.concatenate([u["prob"] for u in unseen])) if unseen else (None, None))
        reasons = [c for c in (estimate_caveat(rate, *((meta["given"], meta["prob"]) if meta else (None, None)),
                                               held_labels, held_probs),
                               switch_caveat(rate, self.switched)) if c]
        return "; and ".join(reasons) + ". " + CAVEAT_ADVICE if reasons else ""


def switch_caveat(noise_rate: float, switched: Optional[dict]) -> Optional[str]:
    """Why the count of a run that switched to plain training is probably low, or None.

    Plain training fits the wrong labels, so in the evidence of the epochs
    after the switch they look right and the end-of-run count falls below
    the estimate the check made from the weighted epochs (``switched``:
    ``{"epoch": 0-based, "estimate"}``, :class:`FinetuneCheck`). Measured:
    digits with 5% wrong labels, 3.1 and 3.5% counted at the end (4.5 and
    5.2% true; the check's 6.9 and 7.2%, ``benchmarks/noise_estimate.py``);
    a 399-row CSV with 6.5% wrong, 0.1 to 0.4% (three seeds). None without a
    switch, or where the count is not below the check's estimate.
    """
    if not switched or not noise_rate < float(switched["estimate"]):
        return None
    return (f"the run trained plainly from epoch {int(switched['epoch']) + 1} on, where the check estimated "
            f"{100 * float(switched['estimate']):.1f}% wrong labels from the weighted epochs; plain training fits "
            f"wrong labels, so they look right afterwards and this count ({100 * noise_rate:.1f}%) is probably low")


# what a run whose count of wrong labels is rough (estimate_caveat, switch_caveat) can do about it
CAVEAT_ADVICE = ("gdw detect RUN --num-issues N flags the N most suspicious rows; gdw detect --folds 3 with the "
                 "same training flags and --val-per-class N counts out of sample (3 trainings)")


def meta_unchecked(data) -> bool:
    """Whether ``data``'s meta set (a :class:`gdw.data.Prepared`) was drawn
    from training labels not known to be clean, with no noise added after
    the draw: the meta set is then as noisy as the labels it would judge
    (from ``data.record``)."""
    rec = getattr(data, "record", None) or {}
    return bool(data.meta is not None and rec.get("meta_source") == "train"
                and rec.get("meta_known_clean") is False and rec.get("realised_noise_rate") is None)


def plain_when_unchecked(method) -> bool:
    """Whether ``method`` trains plainly from the first epoch where
    :func:`meta_unchecked` holds (GDW's ``unchecked_meta`` "plain" or "ce")."""
    return getattr(method, "unchecked_meta", "weight") in ("plain", "ce")


class FinetuneCheck(Callback):
    """Skips a method's fine-tuning phase on the meta set where the run's
    labels look clean (its ``finetune_min_noise`` > 0; GDW's parameter), and
    with ``plain_below`` or ``cap_below`` > 0 (GDW's) changes the weighting
    for the rest of the run where they look clean a quarter of the way in.

    When the phase would start, the share of wrong training labels is
    estimated as at the end of a run (:func:`gdw.find_label_issues` on the
    ``recorder``'s evidence so far, corrected by the model's confusion on the
    meta set, predicted now). Below ``finetune_min_noise``, and with no
    training class 3 or more times as frequent as another
    (``IMBALANCE_BOUND``), training goes on as before to the end: the phase
    trades every training label for the meta set's few, which costs where
    the labels are clean and helps where noise got through. Decided once;
    the decision and the estimate are in the epoch's row
    (``finetune_noise_estimate``, ``finetune_skipped``) and in the checkpoint.

    The same estimate at the start of epoch ``check_epoch(epochs)`` (a
    quarter of the run done), under the same bound on the classes' shares:
    below ``plain_below`` it sets the method's ``plain`` (plain training
    from that epoch on, without fine-tuning); else below ``cap_below`` it
    caps the method's instance weights at 1 (``max_weight``) from then on.
    With the method's ``unchecked_meta="plain"`` (or ``"ce"``), a run whose meta set was
    drawn from training labels not known to be clean (and no noise added
    after: :meth:`unchecked`) trains plainly from its first epoch, whose row
    has ``early_decision: "plain"`` and ``early_reason: "unchecked meta
    set"`` (no estimate). That epoch's row has ``early_noise_estimate`` and ``early_decision``
    (``"plain"``, ``"cap"`` or ``"on"``: the weighting as it was). With the
    method's ``plain_restart``, plain training starts again from the weights
    the model had at ``on_fit_start`` (kept on the CPU until the decision,
    and in the checkpoint, so that a resumed run can restart too) with the
    optimizer's state cleared; the row then has ``early_restart: True``.
    With the method's ``plain_epochs="all"`` the restart also starts the
    schedule again (``state.offset``): the plain training has the run's
    whole schedule, learning rate and batch order as a plain run's, and
    the run ends ``epochs`` epochs after it (the row has
    ``early_restart_epochs``); with ``"left"`` it has the epochs left.
    A switch also goes to the recorder (``switched``), whose count of wrong
    labels then says that it is probably low (:func:`switch_caveat`).
    """

    name = "finetune_check"
    IMBALANCE_BOUND = 3.0
    CHECK_AT = 0.25  # the share of the epochs done when plain_below and cap_below are checked

    def __init__(self, recorder: LabelIssueRecorder, data, batch_size: int = 500):
        self.recorder, self.data, self.batch_size = recorder, data, int(batch_size)
        self.skip: Optional[bool] = None
        self.early: Optional[str] = None  # "plain", "cap" or "on", once decided
        self.initial: Optional[dict] = None  # the model's weights at the start, while a restart may need them
        self.offset = 0  # the epoch where a restart started the schedule again (plain_epochs="all"; 0: none)

    @classmethod
    def check_epoch(cls, epochs: int) -> int:
        """The (0-based) epoch at whose start ``plain_below`` and ``cap_below`` are checked."""
        return max(1, round(cls.CHECK_AT * int(epochs)))

    def _balanced(self) -> bool:
        counts = np.bincount(self.data.train.labels.numpy(), minlength=self.recorder.num_classes)
        return bool(counts.max() < self.IMBALANCE_BOUND * max(counts.min(), 1))

    def on_fit_start(self, state) -> None:
        state.offset = self.offset  # a resumed run that had restarted its schedule
        if getattr(state.method, "plain_restart", False) and float(getattr(state.method, "plain_below", 0) or 0) > 0 \
                and self.early is None and self.initial is None and state.epoch == 0:
            self.initial = {k: v.detach().to("cpu", copy=True) for k, v in state.model.state_dict().items()}

    def unchecked(self) -> bool:
        """:func:`meta_unchecked` of the run's data."""
        return meta_unchecked(self.data)

    def on_epoch_start(self, state) -> None:
        method = state.method
        if self.early is None and plain_when_unchecked(method) and self.unchecked():
            self.early, self.initial = "plain", None  # plain training from the start: nothing to restart
            state.row.update(early_decision="plain", early_reason="unchecked meta set")
        plain_below, cap_below = (float(getattr(method, k, 0.0) or 0.0) for k in ("plain_below", "cap_below"))
        if (plain_below > 0 or cap_below > 0) and self.early is None and state.epoch >= self.check_epoch(state.epochs):
            rate, balanced = self.estimate(state.model), self._balanced()
            factor = float(getattr(method, "raw_factor", 0.0) or 0.0)
            raw = self.disagreement() if factor > 0 else 0.0

            def below(bound):
                return balanced and rate < bound and (factor == 0 or raw < factor * bound)
            self.early = "plain" if below(plain_below) else "cap" if below(cap_below) else "on"
            state.row.update(early_noise_estimate=rate, early_decision=self.early)
            if factor > 0:
                state.row.update(early_disagreement=raw)
            if self.early == "plain" and rate == rate:  # the check's estimate, for the count's caveat (not NaN)
                self.recorder.switched = {"epoch": int(state.epoch), "estimate": float(rate)}
            if self.early == "plain" and self.initial is not None:
                state.model.load_state_dict(self.initial)
                state.optimizer.state.clear()  # no momentum carried over from the weighted steps
                state.row.update(early_restart=True)
                if getattr(method, "plain_epochs", "left") == "all":  # the whole schedule again, from its start
                    self.offset = state.offset = state.epoch
                    state.row.update(early_restart_epochs=state.epochs)
            self.initial = None
        if self.early == "plain":
            method.plain, method.finetuning = True, False
            return
        if self.early == "cap":
            method.max_weight = 1.0 if method.max_weight is None else min(method.max_weight, 1.0)
        threshold = float(getattr(method, "finetune_min_noise", 0.0) or 0.0)
        if threshold <= 0 or not getattr(method, "finetuning", False):
            return
        if self.skip is None:
            rate = self.estimate(state.model)
            self.skip = bool(rate < threshold and self._balanced())
            state.row.update(finetune_noise_estimate=rate, finetune_skipped=self.skip)
        if self.skip:
            method.finetuning = False

    def _seen(self):
        """``(given labels, evidence probabilities)`` of the training rows with evidence so far, or None."""
        ev = self.recorder.evidence()
        seen = ev["count"] > 0
        return (self.data.train.labels.numpy()[seen], ev["prob"][seen]) if seen.any() else None

    def estimate(self, model) -> float:
        """The estimated share of wrong training labels (:func:`gdw.find_label_issues`)."""
        rows = self._seen()
        if rows is None:
            return float("nan")  # nothing recorded: no reason to skip (NaN < threshold is False)
        meta = self.data.meta
        with torch.no_grad():
            prob = predict_proba(model, meta, self.batch_size, self.recorder.device).cpu().numpy()
        found = find_label_issues(*rows, clean_labels=meta.labels.numpy(), clean_pred_probs=prob)
        return float(found.noise_rate)

    def disagreement(self) -> float:
        """The share of training rows with evidence whose most probable class is not their label (uncorrected)."""
        rows = self._seen()
        return float("nan") if rows is None else float(np.mean(rows[1].argmax(1) != rows[0]))

    def state_dict(self) -> dict:
        return {"skip": self.skip, "early": self.early, "initial": self.initial, "offset": self.offset}

    def load_state_dict(self, state: dict) -> None:
        self.skip, self.early, self.initial = state.get("skip"), state.get("early"), state.get("initial")
        self.offset = int(state.get("offset", 0))


def _means(sums: dict) -> dict:
    """Each of ``sums`` divided by ``sums["count"]`` per row (rows never seen: 0); ``count`` as it is."""
    denom = sums["count"].clamp(min=1)
    return {k: v if k == "count" else v / (denom if v.ndim == 1 else denom[:, None]) for k, v in sums.items()}


def _table(data, given, suggested, score, rows, paths, held: dict, test: dict) -> list[dict]:
    """The rows of ``label_issues.csv``: the training examples, then the
    scored test rows (with a ``split`` column), each with its text when the
    run trains on a CSV's text."""
    from .data.text import split_texts

    pre = getattr(data, "preprocess", None)
    table = issues_table(given, suggested, score, list(data.classes), rows, paths, split_texts(data.train, pre))
    if not test:
        return table
    return [{**r, "split": "train"} for r in table] + [
        {**r, "split": "test"} for r in issues_table(held["test"]["given"], test["suggested"], test["score"],
                                                      list(data.classes), test["source_rows"],
                                                      list(test["source_paths"]) or None, split_texts(data.test, pre))]


def score_test_split(data, test: Optional[dict], found, train_given: np.ndarray) -> dict:
    """Label issues in a test split drawn from the user's own data, labels as
    given (as noisy as the training labels; ``{}`` for any other test split,
    or with injected noise): the
    final model's out-of-sample ``score`` (:func:`gdw.issues.label_score`), and in
    each given class the share of rows flagged that the training estimate
    gives that class (the split is a random part of the same data);
    ``suggested`` is the most likely other class on flagged rows."""
    if test is None or data.record.get("test_known_clean", True) or data.record.get("realised_noise_rate") is not None:
        return {}  # no test split of the user's own labels (injected noise leaves the test labels as they were)
    given, prob = test["given"], test["prob"].astype(np.float64)
    score = label_score(prob, given)
    N = found.noise_matrix
    share = (N.sum(1) - np.diag(N)) / np.maximum(np.bincount(train_given, minlength=len(N)), 1)
    flagged = flag_per_class(given, score, share * np.bincount(given, minlength=len(N)))
    rows, paths = source_of(data.test)
    return {"score": score, "suggested": np.where(flagged, most_likely_other(prob, given), given),
            "source_rows": rows, "source_paths": np.array(paths or [], dtype=str)}


def source_of(split) -> tuple[np.ndarray, Optional[list]]:
    """The user's row of every example of ``split`` (the 0-based data row of
    a CSV file, the position in npz arrays; for built-in datasets the
    position in the dataset's training array) and, for image folders, the
    path relative to the folder (else None)."""
    rows = getattr(split, "source_rows", None)
    rows = split.index.numpy() if rows is None else np.asarray(rows)
    paths = getattr(split, "source_paths", None)
    return rows.astype(np.int64), (None if paths is None else [str(p) for p in paths])
