"""Generalized Data Weighting (Chen et al., NeurIPS 2021).

One weight per class-level gradient flow: ω is B×C and the logit gradient is
G = ω ⊙ e / B, with p clamped at 0.999 in e = p − onehot(y). Per step:

1. Stage one, instance weights v copied to every class, ω_ij = v_i:
   ``stage_one="mwnet"`` (the paper): v_i = V(ℓ_i) from the weighting
   network; ``stage_one="l2rw"``: w_i = max(−Σ_j g_ij, 0) from the
   meta-gradient at θ itself (Learning to Reweight's weights), so there is no
   virtual step at all, scaled by ``weight_norm``: ``"kept"`` (default)
   v_i = K·w_i/Σ_k w_k with K the number of examples with w_k > 0 (mean one
   over the examples kept), ``"batch"`` v_i = B·w_i/Σ_k w_k (mean one over
   the batch, L2RW's own scaling).
2. Zero-mean constraint: Σ_j ω_ij e_ij = 0 for every example, by setting
   only the labelled column: ω_{i,y_i} = Σ_{j≠y_i} ω_ij p_ij / (1 − p_{i,y_i}).
3. mwnet: virtual step θ' = θ − α J_zᵀ (ω ⊙ e) / B; L_meta on the meta batch.
   l2rw: θ' = θ.
4. g = ∂L_meta/∂ω = −(α/B) e ⊙ (J_z u), u = ∇L_meta(θ'); for mwnet it also
   reaches V (Adam step).
5. Stage two: ω' = ω − clip(η_ω · g / Σ|g|, −c, c), clamped to
   [1e-6, 1e6], then the zero-mean constraint again (same p). With
   ``class_grad="constrained"`` (the default with ``stage_one="l2rw"``) g is
   first replaced by the gradient with respect to the weights the
   constraint leaves free: ĝ_ij = g_ij + g_{i,y_i} p_ij / (1 − p_{i,y_i})
   for j ≠ y_i, 0 on the labelled column (:func:`zero_mean_grad`). The
   paper's raw g includes a part the constraint then removes (what a shift
   of all of example i's logits by one constant does to L_meta, which its
   softmax does not see); ĝ does not.
6. Real step: G = ω' ⊙ e / B.

With ``stage_one="l2rw"`` one meta-gradient serves both stages and a step
costs what an L2RW step costs.

Logit adjustment (``tau``, default 1 with ``stage_one="l2rw"``, 0 with
``"mwnet"``): p is the softmax of z + τ log π, π the share of each class among
the training labels (``class_counts``), in every step above, so that the
training loss is the logit-adjusted loss (``la``) weighted by ω; the meta
loss and predictions use z itself. With balanced labels log π is the same for
every class and the softmax does not see it; under class imbalance it
corrects the prior shift that L2RW's weights would otherwise correct by
moving weight from the frequent classes' examples to the rare ones'.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import inputs as model_inputs
from ..distributed import Comm
from ..engine import full
from ..errors import UserError
from .base import METHODS, check_bool, check_positive, logit_error
from .gate import GATE_FORMS, NoiseGate
from .guard import MetaGuard
from .la import log_prior
from .meta import WeightNetMethod


def _is_inf(value) -> bool:
    try:
        return math.isinf(float(value)) and float(value) > 0
    except (TypeError, ValueError):
        return False


# with max_weight="auto", a class this many times as frequent as another keeps the cap: below the long tails (10 : 1
# and up); 40% flips move the given labels' counts to 2.3 : 1 to 4.5 : 1 (the suite's runs), some of them above it
AUTO_CAP_RATIO = 4.0


def auto_max_weight(model: torch.nn.Module, class_counts=None, meta_counts=None,
                    meta_ratio: float = math.inf) -> tuple[float, str]:
    """``(cap, why)``: the cap that ``max_weight="auto"`` stands for and the
    reason in words. ``math.inf`` (no cap) where ``model`` has a BatchNorm
    layer and ``class_counts`` (C training examples per class) are known,
    with no class ``AUTO_CAP_RATIO`` (4) or more times as frequent as
    another, and, with ``meta_counts`` (the meta set's C class counts), no
    meta class ``meta_ratio`` or more times as frequent as another (a meta
    set drawn in the data's own shares, or checked in them, shows a natural
    class prior); else 1.

    Without the cap the instance weights, scaled to mean one over the K
    examples a batch keeps, can reach K. A model without normalisation
    layers at SGD 0.1 blew up under such steps, and under a long tail the
    few kept examples of the rare classes get the largest weights; with
    BatchNorm and classes of about equal size the cap only shrinks the step
    where most of a batch is dropped (design question 14). Other
    normalisation layers (LayerNorm, GroupNorm) keep the cap: the suite has
    no such model to show that they are safe without it.
    """
    if class_counts is None:
        return 1.0, "no class counts"
    if not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return 1.0, "the model has no BatchNorm layer"
    for counts, bound, whose in ((class_counts, AUTO_CAP_RATIO, "classes'"), (meta_counts, meta_ratio, "meta set's")):
        if counts is not None and math.isfinite(bound):
            c = torch.as_tensor(counts, dtype=torch.float64).clamp(min=1)
            ratio = float(c.max() / c.min())
            if ratio >= bound:
                return 1.0, f"the {whose} shares are uneven, {ratio:.1f} : 1"
    return math.inf, "the model has BatchNorm and no class is 4 or more times as frequent as another"


def _l2rw_only(name: str, value, stage_one: str) -> float:
    """A non-negative option that only L2RW's stage one takes (0: off)."""
    value = check_positive(name, value, allow_zero=True)
    if value > 0 and stage_one != "l2rw":
        raise UserError(f"{name} needs stage_one='l2rw' (set {name}=0 with stage_one='mwnet')")
    return value


def toward_plain(v: torch.Tensor, lam) -> torch.Tensor:
    """(1 − λ)·v + λ: instance weights mixed with plain training's (λ = 0: ``v`` itself)."""
    return v if isinstance(lam, (int, float)) and lam == 0 else (1 - lam) * v + lam


def zero_mean(omega: torch.Tensor, p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Set ω_{i,y_i} so that Σ_j ω_ij (p_ij − onehot_ij) = 0 for every row.

    Args:
        omega: B×C weights; p: B×C probabilities with p_{i,y_i} < 1; y: (B,).
    Returns:
        A new B×C tensor, equal to ``omega`` off the labelled column
        (differentiable in ``omega``).
    """
    onehot = F.one_hot(y, omega.shape[1]).to(omega.dtype)
    p_y = (p * onehot).sum(1)
    target = (omega * p * (1 - onehot)).sum(1) / (1 - p_y)
    return omega * (1 - onehot) + target[:, None] * onehot


def zero_mean_grad(g: torch.Tensor, p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The gradient through the zero-mean constraint: the vector-Jacobian
    product of :func:`zero_mean` with ``g``.

    If ``g`` is the gradient of a loss with respect to ``zero_mean(ω)``, the
    result is its gradient with respect to ω: off the labelled column
    ``g_ij + g_{i,y_i} p_ij / (1 − p_{i,y_i})``, and 0 on it (the constraint
    overwrites that column). It does not see a shift of ``g``'s row i by a
    multiple of e_i, i.e. the part of the meta-gradient that the zero-mean
    constraint removes.

    Args:
        g: B×C; p: B×C probabilities with p_{i,y_i} < 1; y: (B,).
    Returns:
        A new B×C tensor, zero in the labelled column.
    """
    onehot = F.one_hot(y, g.shape[1]).to(g.dtype)
    g_y = (g * onehot).sum(1)
    p_y = (p * onehot).sum(1)
    return (g + (g_y / (1 - p_y))[:, None] * p) * (1 - onehot)


STAGE_ONE = ("mwnet", "l2rw")
GUARD = 0.05  # ρ₀ of the held-out check (guard.py), when it is on
GATE_FINETUNE = 0.5  # with the gate, the fine-tuning phase runs only while its λ is below this (gate.py)
WEIGHT_NORM = ("batch", "kept", "binary")
CLASS_GRAD = ("raw", "constrained")
META_PRIOR = ("model", "meta")
UNCHECKED_META = ("weight", "plain", "ce")


@METHODS.register("gdw")
class GDW(WeightNetMethod):
    """Generalized Data Weighting: class-level weights learned on a meta set.

    The default is GDW on L2RW's stage one (its weights scaled to mean one
    over the examples they keep), its class-level step along the gradient
    through the zero-mean constraint, with the logit-adjusted loss and ending
    with fine-tuning on the meta set: it holds up where the network
    memorises fast and under class imbalance (README, "Which method when").
    ``stage_one="mwnet"`` is the paper's algorithm exactly (and then no
    adjustment and no fine-tuning unless asked for).

    Args (besides those of MetaMethod and the weighting network):
        stage_one: where the instance weights come from: ``"l2rw"``
            (default: Learning to Reweight's weights from the one
            meta-gradient at θ; no virtual step, no V: ``hidden``,
            ``meta_lr`` and ``meta_weight_decay`` are then unused) or
            ``"mwnet"`` (the paper: MW-Net's weighting network V).
        weight_norm: how L2RW's weights are scaled (``stage_one="l2rw"``
            only): ``"kept"`` (default), to mean one over the examples whose
            weight is above zero, so that dropping examples shrinks the step
            rather than inflating the weights of the rest; ``"batch"``,
            to mean one over the batch (L2RW's own scaling); or
            ``"binary"``: one for every example kept, zero for the others
            (the step of plain training on the examples kept).
        finetune_fraction: the share of the last epochs trained with plain
            cross-entropy on the meta set (see :class:`Method`); default 0.2
            with ``stage_one="l2rw"``, 0 with ``"mwnet"`` (the paper).
        eta: η_ω, the step of the class-level update (default 10·C: 100 for
            10 classes, 1000 for 100).
        clip: c, bound on each entry of the class-level step (0.2).
        omega_min, omega_max: clamp of ω' (1e-6, 1e6).
        p_max: clamp of the probabilities (0.999).
        zero_mean: apply the zero-mean constraint (True; False is an ablation).
        shrink: λ in [0, 1]: the stage-one instance weights become
            (1 − λ)·v + λ, a mix with plain training's weights of one
            (``stage_one="l2rw"`` only; default 0).
        max_weight: a cap on the stage-one instance weights v_i after their
            scaling (``stage_one="l2rw"`` only; ``math.inf``, or ``inf`` on
            the command line: no cap). Default 1 with ``stage_one="l2rw"``:
            no example weighs more than in plain training, however few
            examples a batch keeps (scaled to mean one over K kept examples,
            one example could otherwise get a weight of up to K, a step that
            blew up models without normalisation layers); no cap with
            ``"mwnet"``. ``"auto"``: no cap where the model has a BatchNorm
            layer and no training class is 4 or more times as frequent as
            another (it needs ``class_counts``), else 1 (:func:`auto_max_weight`).
        cap_meta_ratio: with ``max_weight="auto"``, the cap also stays where
            the meta set's most frequent class is this many times as
            frequent as its rarest (``meta_counts``: a meta set with a
            natural class prior); ``math.inf`` (default): the meta set's
            shares play no part.
        gate: r₀ ≥ 0 of the noise gate (gate.py; ``stage_one="l2rw"``
            only; 0: off): the training labels' excess noise over the meta
            set's, estimated in the first epoch, decides how much weighting
            the rest of the run gets.
        gate_form: ``"linear"`` (λ = clamp(1 − r̂/r₀, 0, 1)) or ``"step"``
            (plain training where r̂ < r₀, else the full weighting).
        finetune_min_noise: in [0, 1); > 0: ``gdw.fit`` (``gdw train``)
            starts the fine-tuning phase only where the run's estimate of
            the share of wrong training labels, made from its label-issue
            evidence when the phase would start, reaches it, or where a
            training class is 3 or more times as frequent as another
            (:class:`gdw.recorder.FinetuneCheck`; a loop of your own
            fine-tunes regardless). Default 0.04 with ``stage_one="l2rw"``
            (design question 9), 0 (always) with ``"mwnet"``.
        plain_below: in [0, 1); > 0: ``gdw.fit`` (``gdw train``) estimates
            the share of wrong training labels in the same way once a
            quarter of the epochs are done (``FinetuneCheck.CHECK_AT``), and where it
            is below ``plain_below`` and no training class is 3 or more
            times as frequent as another, the rest of the run is plain
            training on the (logit-adjusted) loss: no meta-gradient, no
            class-level step, no fine-tuning, at a plain step's cost
            (``stage_one="l2rw"`` only; 0: off). Default 0.08 with
            ``stage_one="l2rw"`` (design question 18), 0 with ``"mwnet"``.
        cap_below: in [0, 1); > 0: the same check, and where the estimate
            is below ``cap_below`` (and not below ``plain_below``), the
            instance weights are capped at 1 for the rest of the run, as
            ``max_weight=1`` does (``stage_one="l2rw"`` only; 0: off).
        raw_factor: ≥ 0; > 0: the check of ``plain_below`` and ``cap_below``
            also needs the uncorrected share of training labels its evidence
            disagrees with to be below ``raw_factor`` times the bound: the
            estimate subtracts the model's own mistakes as the meta set shows
            them, and where the meta set's classes are shared otherwise than
            the training data's (a long tail) that correction can remove
            most of heavy noise. Default 2 with ``stage_one="l2rw"`` (design
            question 20), 0 (no such condition) with ``"mwnet"``.
        plain_restart: where ``plain_below`` switches to plain training, start
            it again from the model's initial weights (those it had when
            ``gdw.fit`` began) with the optimizer's state cleared, for the
            epochs left, instead of going on from the weights the weighting
            reached: with BatchNorm, the weighted steps grow the weights of
            the layers before it, so that the plain steps that follow move
            the model less than from the start. Default True with
            ``stage_one="l2rw"`` (design question 19), False with ``"mwnet"``.
        unchecked_meta: what ``gdw train`` does where the meta set was drawn
            from the training labels themselves and they are not known to be
            clean (no ``--meta`` of checked examples, a dataset of the user's
            own, no noise added after the draw): ``"weight"``, the weighting
            as with a clean meta set; ``"plain"``, plain training from the
            first epoch (on the logit-adjusted loss, without fine-tuning):
            the meta set is then as noisy as the labels it would judge, and
            the weighting learns nothing cleaner from it; ``"ce"``, the same
            but training and predicting as ``--method ce`` does (no logit
            adjustment, predictions aimed from the training labels' prior:
            :meth:`train_as_ce`), so that the run is a CE run bit for bit.
            Default ``"ce"`` with ``stage_one="l2rw"`` (design question 22
            chose plain training; a plain run is CE's), ``"weight"`` with
            ``"mwnet"``. In a loop of one's own there is no such check.
        plain_epochs: how long that restarted plain training runs: ``"left"``,
            the epochs of the run that remain, on the rest of its cosine
            schedule; ``"all"``, the whole schedule again from its start
            (learning rate and batch order as a plain run's), so that the run
            ends ``epochs`` epochs after the restart and its plain training is
            a plain run's. Default ``"left"`` (design question 21 kept it:
            the whole schedule again was not higher on validation).
        class_grad: the gradient the class-level step follows: ``"raw"``
            (the paper's: ∂L_meta/∂ω of the constrained ω, whose labelled
            column the constraint then overwrites) or ``"constrained"``
            (∂L_meta with respect to the weights the step can change, through
            the zero-mean constraint; see :func:`zero_mean_grad`). Default
            ``"constrained"`` with ``stage_one="l2rw"``, ``"raw"`` with
            ``"mwnet"`` (the paper). Without the constraint
            (``zero_mean=False``) the two are the same.
        tau: τ ≥ 0, the strength of the logit adjustment (default 1 with
            ``stage_one="l2rw"``, 0 with ``"mwnet"``, the paper); it needs
            ``class_counts``.
        class_counts: training examples per class, C whole numbers ≥ 0 (an
            empty class counts as one); ``gdw train`` passes the training
            labels' counts. Without it there is no adjustment, whatever τ.
        meta_prior: which class prior the meta loss judges the model under,
            with the logit adjustment on: ``"model"``, its logits z as they
            are (they fit a balanced prior), or ``"meta"``, z + log π_meta
            (π_meta the meta set's class shares, from ``meta_counts``), so
            that where the meta set's classes are not balanced (a meta set
            drawn in the training labels' shares) the meta-gradient does not
            also ask for the difference between the two priors and move
            weight from the rare classes' examples to the frequent ones'.
            The same as ``"model"`` when the meta set is balanced, without
            ``meta_counts`` or without the adjustment. Default ``"meta"``
            with ``stage_one="l2rw"`` (design question 13), ``"model"`` with
            ``"mwnet"``.
        meta_counts: meta examples per class, C whole numbers ≥ 0; ``gdw
            train`` passes the meta set's counts.
    """

    needs_class_counts = True  # for the logit adjustment (tau); optional when calling it directly
    needs_meta_counts = True  # for meta_prior="meta"; optional when calling it directly
    # the defaults that follow stage_one: the paper's algorithm with "mwnet", gdw's own with "l2rw"
    STAGE_DEFAULTS = {"l2rw": {"finetune_fraction": 0.2, "tau": 1.0, "meta_grad": "fd", "weight_norm": "kept",
                               "class_grad": "constrained", "max_weight": "auto", "guard": 0.0,
                               "gate": 0.0, "gate_form": "linear", "finetune_min_noise": 0.04,
                               "meta_prior": "meta", "cap_meta_ratio": math.inf, "plain_below": 0.08, "cap_below": 0.0,
                               "plain_restart": True, "raw_factor": 2.0, "plain_epochs": "left",
                               "unchecked_meta": "ce"},
                      "mwnet": {"finetune_fraction": 0.0, "tau": 0.0, "meta_grad": "jvp", "weight_norm": "batch",
                                "class_grad": "raw", "max_weight": math.inf, "guard": 0.0, "gate": 0.0,
                                "gate_form": "linear", "finetune_min_noise": 0.0, "meta_prior": "model",
                                "cap_meta_ratio": math.inf, "plain_below": 0.0, "cap_below": 0.0,
                                "plain_restart": False, "raw_factor": 0.0, "plain_epochs": "left",
                                "unchecked_meta": "weight"}}
    ADDED_PARAMS = {"weight_norm": "batch", "class_grad": "raw",
                    "max_weight": math.inf, "shrink": 0.0, "guard": 0.0,
                    "gate": 0.0, "gate_form": "linear",
                    "finetune_min_noise": 0.0, "meta_prior": "model",
                    "cap_meta_ratio": math.inf, "plain_below": 0.0,
                    "cap_below": 0.0, "plain_restart": False,
                    "raw_factor": 0.0, "plain_epochs": "left",
                    "unchecked_meta": "weight"}  # what runs recorded before these existed used
    # parameters that change nothing in a run unless its summary.json says so (field, value): a run recorded
    # before one existed is the same run whatever its value where the summary shows something else
    INERT_UNLESS = {"plain_restart": ("early_decision", "plain"), "raw_factor": ("early_decision", "plain"),
                    "plain_epochs": ("early_restart", True), "unchecked_meta": ("meta_unchecked", True)}

    @classmethod
    def resolve_params(cls, params: dict) -> dict:
        defaults = cls.STAGE_DEFAULTS.get(params.get("stage_one", "l2rw"), {})
        return {**params, **{k: v for k, v in defaults.items() if params.get(k) is None}}

    def __init__(self, model, num_classes, *, stage_one: str = "l2rw", weight_norm: str | None = None,
                 eta: float | None = None, clip: float = 0.2,
                 omega_min: float = 1e-6, omega_max: float = 1e6, p_max: float = 0.999,
                 zero_mean: bool = True, class_grad: str | None = None, finetune_fraction: float | None = None,
                 tau: float | None = None, meta_grad: str | None = None, class_counts=None,
                 max_weight: float | None = None, shrink: float = 0.0, guard: float | None = None,
                 gate: float | None = None, gate_form: str | None = None, finetune_min_noise: float | None = None,
                 meta_prior: str | None = None, meta_counts=None, cap_meta_ratio: float | None = None,
                 plain_below: float | None = None, cap_below: float | None = None,
                 plain_restart: bool | None = None, raw_factor: float | None = None,
                 plain_epochs: str | None = None, unchecked_meta: str | None = None, **kw):
        if stage_one not in STAGE_ONE:
            raise UserError(f"stage_one must be one of {', '.join(STAGE_ONE)}, got {stage_one!r}")
        resolved = self.resolve_params({"stage_one": stage_one, "finetune_fraction": finetune_fraction,
                                        "tau": tau, "meta_grad": meta_grad, "weight_norm": weight_norm,
                                        "class_grad": class_grad, "max_weight": max_weight, "guard": guard,
                                        "gate": gate, "gate_form": gate_form,
                                        "finetune_min_noise": finetune_min_noise, "meta_prior": meta_prior,
                                        "cap_meta_ratio": cap_meta_ratio, "plain_below": plain_below,
                                        "cap_below": cap_below, "plain_restart": plain_restart,
                                        "raw_factor": raw_factor, "plain_epochs": plain_epochs,
                                        "unchecked_meta": unchecked_meta})
        finetune_fraction, tau, meta_grad, weight_norm, class_grad, max_weight, guard, gate, gate_form, min_noise = (
            resolved[k] for k in ("finetune_fraction", "tau", "meta_grad", "weight_norm", "class_grad", "max_weight",
                                  "guard", "gate", "gate_form", "finetune_min_noise"))
        meta_prior = resolved["meta_prior"]
        self.has_weight_net = stage_one == "mwnet"  # V only for the paper's stage one
        super().__init__(model, num_classes, finetune_fraction=finetune_fraction, meta_grad=meta_grad, **kw)
        self.stage_one = stage_one
        self.finetune_min_noise = check_positive("finetune_min_noise", min_noise, allow_zero=True)
        if self.finetune_min_noise >= 1:
            raise UserError(f"finetune_min_noise must lie in [0, 1), got {min_noise!r}")
        self.plain_below, self.cap_below = (_l2rw_only(k, resolved[k], stage_one) for k in ("plain_below", "cap_below"))
        for k in ("plain_below", "cap_below"):
            if getattr(self, k) >= 1:
                raise UserError(f"{k} must lie in [0, 1), got {resolved[k]!r}")
        self.plain_restart = check_bool("plain_restart", resolved["plain_restart"])
        self.raw_factor = check_positive("raw_factor", resolved["raw_factor"], allow_zero=True)
        self.plain_epochs = resolved["plain_epochs"]
        if self.plain_epochs not in ("left", "all"):
            raise UserError(f"plain_epochs must be 'left' or 'all', got {self.plain_epochs!r}")
        self.unchecked_meta = resolved["unchecked_meta"]
        if self.unchecked_meta not in UNCHECKED_META:
            raise UserError(f"unchecked_meta must be one of {', '.join(UNCHECKED_META)}, got {self.unchecked_meta!r}")
        if self.unchecked_meta != "weight" and stage_one != "l2rw":
            raise UserError(f"unchecked_meta={self.unchecked_meta!r} needs stage_one='l2rw' "
                            "(the paper's stage one always weights)")
        self.as_ce = False  # set by train_as_ce
        if self.plain_restart and self.plain_below == 0 and plain_restart is not None:
            raise UserError("plain_restart needs plain_below > 0 (it restarts the plain training plain_below starts)")
        # set by gdw.recorder.FinetuneCheck where the labels look clean: plain training from then on
        self.plain = False
        if weight_norm not in WEIGHT_NORM:
            raise UserError(f"weight_norm must be one of {', '.join(WEIGHT_NORM)}, got {weight_norm!r}")
        self.weight_norm = weight_norm
        self.shrink = check_positive("shrink", shrink, allow_zero=True)
        if self.shrink > 1:
            raise UserError(f"shrink must lie in [0, 1], got {shrink!r}")
        # inf: no cap; "auto": no cap only where that is known to be safe (auto_max_weight)
        meta_ratio = resolved["cap_meta_ratio"]
        meta_ratio = math.inf if _is_inf(meta_ratio) else check_positive("cap_meta_ratio", meta_ratio)
        self.cap_note = None  # with "auto": the cap it chose, in words (gdw train prints it)
        if max_weight == "auto":
            max_weight, why = auto_max_weight(model, class_counts, meta_counts, meta_ratio)
            self.cap_note = (f"no cap on the instance weights ({why})" if _is_inf(max_weight) else
                             f"instance weights capped at 1 ({why}; max_weight=inf lifts it)")
        self.max_weight = None if _is_inf(max_weight) else check_positive("max_weight", max_weight)
        self.first_max_weight = self.max_weight  # as decided here (cap_below may lower it during a run)
        guard, gate = (_l2rw_only(name, value, stage_one) for name, value in (("guard", guard), ("gate", gate)))
        self.guard = MetaGuard(guard) if guard > 0 else None
        if gate_form not in GATE_FORMS:
            raise UserError(f"gate_form must be one of {', '.join(GATE_FORMS)}, got {gate_form!r}")
        self.gate = NoiseGate(gate, self.num_classes, gate_form) if gate > 0 else None
        if stage_one == "l2rw":
            self.virtual_step = False
        self.eta = check_positive("eta", 10.0 * self.num_classes if eta is None else eta, allow_zero=True)
        self.clip = check_positive("clip", clip, allow_zero=True)
        self.omega_min = check_positive("omega_min", omega_min, allow_zero=True)
        self.omega_max = check_positive("omega_max", omega_max)
        if self.omega_min > self.omega_max:
            raise UserError(f"omega_min ({omega_min}) must not exceed omega_max ({omega_max})")
        self.p_max = check_positive("p_max", p_max)
        if self.p_max >= 1:
            raise UserError(f"p_max must be below 1, got {p_max!r}")
        self.zero_mean = check_bool("zero_mean", zero_mean)
        if class_grad not in CLASS_GRAD:
            raise UserError(f"class_grad must be one of {', '.join(CLASS_GRAD)}, got {class_grad!r}")
        self.class_grad = class_grad
        self.tau = check_positive("tau", tau, allow_zero=True)
        self.log_prior = None  # no adjustment without class counts
        if class_counts is not None and self.tau > 0:
            self.log_prior = log_prior(class_counts, self.num_classes)
        if meta_prior not in META_PRIOR:
            raise UserError(f"meta_prior must be one of {', '.join(META_PRIOR)}, got {meta_prior!r}")
        self.meta_prior = meta_prior
        self.meta_shift = None  # the meta loss on z + log π_meta (centred; None where that is the same as z)
        if meta_prior == "meta" and self.log_prior is not None and meta_counts is not None:
            shift = log_prior(meta_counts, self.num_classes)
            shift = shift - shift.mean()
            self.meta_shift = shift if float(shift.abs().max()) > 1e-9 else None

    @property
    def decided_params(self) -> dict:
        """Settings decided from the model and the data (``gdw train`` puts
        them in summary.json): with L2RW's stage one, ``max_weight``, the
        cap in force at the start (``"inf"``: none), which ``"auto"``
        resolves."""
        if self.stage_one != "l2rw":
            return {}
        return {"max_weight": "inf" if self.first_max_weight is None else self.first_max_weight}

    @property
    def fits_prior(self) -> str:
        """Balanced with the logit adjustment (τ > 0 and class counts), else the
        meta set's; the training labels' after :meth:`train_as_ce`."""
        return "train" if self.as_ce else "balanced" if self.log_prior is not None else "meta"

    def train_as_ce(self) -> None:
        """Train plainly from now on exactly as :class:`gdw.methods.CE` does:
        no weighting, no fine-tuning, no logit adjustment, and
        :attr:`fits_prior` ``"train"`` (a run's predictions are then shifted
        as a CE run's). ``gdw train`` calls it before the first epoch where
        ``unchecked_meta="ce"`` applies; no cap note is printed then, as
        there are no weights to cap."""
        self.as_ce, self.plain, self.finetuning = True, True, False
        self.log_prior, self.meta_shift, self.cap_note = None, None, None

    def _constrain(self, omega, p, y):
        return zero_mean(omega, p, y) if self.zero_mean else omega

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.gate is not None:
            state = {**state, "gate": self.gate.state_dict()}
        return {**state, "guard": self.guard.state_dict()} if self.guard is not None else state

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        guard, gate = state.pop("guard", None), state.pop("gate", None)
        if self.gate is not None and gate is not None:
            self.gate.load_state_dict(gate, self.device)
        if self.guard is not None and guard is not None:
            self.guard.load_state_dict(guard)
        super().load_state_dict(state)

    def epoch_record(self) -> dict:
        """With the guard: its λ and ρ at the end of the epoch (guard.py); with
        the gate: the excess noise it estimated and its λ (gate.py)."""
        record = {}
        if self.gate is not None and self.gate.decided:
            record.update(gate_noise=self.gate.rate, gate_shrink=self.gate.lam)
        if self.guard is not None and self.guard.rho is not None:
            record.update(guard_shrink=float(self.guard.shrink()), guard_rho=float(self.guard.rho))
        return record

    def on_epoch_start(self, epoch: int, epochs: int) -> None:
        """As :class:`Method`'s; the gate decides at the start of the second
        epoch (gate.py), and with the gate or the guard the fine-tuning phase
        starts only while the meta set's weighting carries over (guard.py)."""
        super().on_epoch_start(epoch, epochs)
        if self.gate is not None and epoch >= 1:
            self.gate.decide(self.comm if self.comm is not None else Comm())
            self.finetuning = self.finetuning and self.gate.lam < GATE_FINETUNE
        if self.finetuning and self.guard is not None:
            if self.guard.finetune is None:  # decided once, when the phase would start
                self.guard.finetune = self.guard.trusts_meta_set()
            self.finetuning = self.guard.finetune

    def meta_before_forward(self, x, x_meta, y_meta):
        """As :class:`MetaMethod`'s; nothing once the weighting is off (the gate, or ``plain``)."""
        if self.plain or (self.gate is not None and self.gate.off):
            return None
        return super().meta_before_forward(x, x_meta, y_meta)

    def _scale(self, w: torch.Tensor, total, kept, n) -> torch.Tensor:
        """Stage-one instance weights from the clamped alignments ``w`` (B,)."""
        if self.weight_norm == "binary":  # one for every example kept: its plain-training weight
            v = (w > 0).to(w.dtype)
        else:
            k = n if self.weight_norm == "batch" else kept
            v = torch.where(total > 0, k * w / total.clamp(min=torch.finfo(w.dtype).tiny), torch.zeros_like(w))
        return v.clamp(max=self.max_weight) if self.max_weight is not None else v

    def _guard_shrink(self, fwd, dA, e, x_meta, y_meta, lr):
        """λ from the held-out check (guard.py); one more meta-gradient, on half the meta batch."""
        m = y_meta.shape[0]
        h = m // 2
        saved, fwd.meta = fwd.meta, None
        try:
            _, dA_half = self.meta_step(fwd, None, model_inputs.take(x_meta, slice(None, h)), y_meta[:h], lr)
        finally:
            fwd.meta = saved

        def weights(align):
            w = align.clamp(min=0)
            return self._scale(w, w.sum(), (w > 0).sum().to(w.dtype), w.shape[0])
        return self.guard.update(dA, e, dA_half, m, h, weights)

    def logit_grad(self, fwd, y, x_meta, y_meta, lr):
        B, C = y.shape[0], self.num_classes
        n = fwd.B  # the whole batch, over all ranks
        z = fwd.logits.detach()
        if self.log_prior is not None:
            z = full(z)
            z = z + self.tau * self.log_prior.to(z.device, z.dtype)
        p, e = logit_error(z, y, C, self.p_max)
        if self.plain or (self.gate is not None and self.gate.off):  # plain training on the adjusted loss
            ones = torch.ones_like(e)
            G = logit_error(z, y, C)[1] / n  # unclamped: exactly the loss's gradient
            return {"G": G, "weights": ones, "meta_loss": None, "instance_weights": ones[:, 0]}
        if self.stage_one == "l2rw":
            meta_loss, dA = self.meta_step(fwd, None, x_meta, y_meta, lr)
            g = dA * e / n
            w = (-g.sum(1)).clamp(min=0)
            # mean one over the batch, or over the examples that keep a weight (both sums over ranks, one collective)
            total, kept = fwd.comm.sum(torch.stack([w.sum(), (w > 0).sum().to(w.dtype)]))
            v = self._scale(w, total, kept, n)
            v = toward_plain(v, self.shrink)
            if self.gate is not None:
                if not self.gate.decided and fwd.meta is not None and fwd.meta.correct is not None:
                    self.gate.add(fwd.logits.detach(), y, fwd.meta.correct, y_meta)
                v = toward_plain(v, self.gate.lam)
            if self.guard is not None and y_meta.shape[0] >= 4:
                due = self.guard.due()
                lam = self._guard_shrink(fwd, dA, e, x_meta, y_meta, lr) if due else self.guard.shrink()
                v = toward_plain(v, lam.to(v.device, v.dtype))
            omega = self._constrain(v[:, None].expand(B, C), p, y)
        else:
            losses = F.cross_entropy(full(z), y, reduction="none")
            v = self.vnet(losses)
            omega = self._constrain(v[:, None].expand(B, C), p, y)
            meta_loss, dA = self.meta_step(fwd, omega.detach() * e / n, x_meta, y_meta, lr)
            g = dA * e / n
            self.update_vnet(omega, g, fwd.comm)
        with torch.no_grad():
            if self.class_grad == "constrained" and self.zero_mean:
                g = zero_mean_grad(g, p, y)
            total = fwd.comm.sum(g.abs().sum())
            tiny = torch.finfo(g.dtype).tiny
            step = torch.where(total > 0, self.eta * g / total.clamp(min=tiny), torch.zeros_like(g))
            omega = (omega.detach() - step.clamp(-self.clip, self.clip)).clamp(self.omega_min, self.omega_max)
            omega = self._constrain(omega, p, y)
        return {"G": omega * e / n, "weights": omega, "meta_loss": meta_loss, "instance_weights": v.detach()}
