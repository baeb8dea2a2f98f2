"""Models whose forward returns a tuple, a dict or an object with ``.logits``.

The rule (``gdw.engine.logits_of``): an ``output=`` callable if given, else
``.logits``, else ``["logits"]``, else the first element of a tuple/list.
Every form must give exactly the ``.grad`` of the same model returning the
plain tensor, for every forward the methods run (the real one, the meta
forward at θ', the JVP, the head-only capture, the recomputed forward).
"""

import copy
from collections import namedtuple

import pytest
import torch
import torch.nn as nn

import gdw
from gdw.engine import logits_of
from gdw.models import check_logits
from models import C, make_batch, make_model

LR = 0.3


class HFOutput:
    """Hugging Face style: attributes, and ``logits`` not first."""

    def __init__(self, loss, logits, hidden):
        self.loss, self.logits, self.hidden_states = loss, logits, hidden


Pair = namedtuple("Pair", ["features", "logits"])  # a tuple whose first element is NOT the logits


class Wrapped(nn.Module):
    """The same network as ``inner``, returning its logits inside ``form``."""

    def __init__(self, inner, form):
        super().__init__()
        self.inner, self.form = inner, form

    def forward(self, x):
        z = self.inner(x)
        feats = z.detach() * 0 + 1  # a second tensor that must not be mistaken for the logits
        if self.form == "tuple":
            return (z, feats)
        if self.form == "list":
            return [z, feats]
        if self.form == "dict":
            return {"features": feats, "logits": z}
        if self.form == "object":
            return HFOutput(None, z, feats)
        if self.form == "namedtuple":
            return Pair(feats, z)
        if self.form == "callable":  # the logits second: only output= finds them
            return (feats, {"scores": z})
        raise AssertionError(self.form)


FORMS = {
    "tuple": {},
    "list": {},
    "dict": {},
    "object": {},
    "namedtuple": {},
    "callable": {"output": lambda out: out[1]["scores"]},
}
VARIANTS = [
    ("ce", {}),
    ("l2rw", {}),
    ("l2rw", {"meta_grad": "double"}),
    ("l2rw", {"head_only": True}),
    ("mwnet", {}),
    ("mwnet", {"meta_grad": "double"}),
    ("mwnet", {"head_only": True}),
    ("gdw", {}),
    ("gdw", {"meta_grad": "double"}),
    ("gdw", {"head_only": True}),
    ("gdw", {"head_only": True, "meta_grad": "double"}),
    ("gdw", {"low_memory": True}),
    ("dm", {}),
    ("focal", {}),
]


def one_step(name, model, kw, kind, dropout_seed=0):
    x, y = make_batch(kind, 8, 1)
    xm, ym = make_batch(kind, 6, 2)
    torch.manual_seed(dropout_seed)  # same weighting network and dropout masks for every form
    method = gdw.make(name, model, C, **kw)
    if getattr(method, "vnet", None) is not None:
        method.vnet.double()
    stats = method.backward(x, y, xm, ym, inner_lr=LR)
    return stats, [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("name,kw", VARIANTS, ids=[f"{n}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for n, kw in VARIANTS])
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_every_output_form_gives_the_plain_gradient(form, name, kw, kind):
    extra = {"dropout": 0.3} if kind == "mlp" else {}  # dropout: the replayed forwards must see the same masks
    plain = make_model(kind, **extra)
    wrapped = Wrapped(copy.deepcopy(plain), form)
    ref_stats, ref_grads = one_step(name, plain, kw, kind)
    stats, grads = one_step(name, wrapped, {**kw, **FORMS[form]}, kind)
    for a, b in zip(grads, ref_grads):
        assert torch.equal(a, b)
    assert torch.equal(stats.weights, ref_stats.weights)
    assert torch.equal(stats.logits, ref_stats.logits)
    assert torch.equal(stats.loss, ref_stats.loss)
    if ref_stats.meta_loss is not None:
        assert torch.equal(stats.meta_loss, ref_stats.meta_loss)
    for (n, a), b in zip(wrapped.inner.named_buffers(), plain.buffers()):  # BatchNorm saw one forward in both
        assert torch.equal(a, b), n


def test_the_rule_order():
    z, other = torch.zeros(2, C), torch.ones(2, C)
    assert logits_of(z) is z
    assert logits_of((z, other)) is z and logits_of([z, other]) is z
    assert logits_of({"features": other, "logits": z}) is z
    assert logits_of(HFOutput(other, z, other)) is z
    assert logits_of(Pair(other, z)) is z  # .logits comes before the first element
    assert logits_of(Pair(other, z), output=lambda out: out.features) is other  # output= comes first
    assert logits_of(z, output=lambda out: out * 0) is not z


BAD = [
    ({"features": torch.zeros(2, C)}, "dict without a 'logits' key"),
    ("logits", "got str"),
    (None, "got NoneType"),
    ((), "got tuple"),
    (("text", torch.zeros(2, C)), "got tuple"),
    ({"logits": "text"}, "got dict"),
    (HFOutput(None, None, torch.zeros(2, C)), "got HFOutput"),
    (42, "got int"),
]


@pytest.mark.parametrize("out,message", BAD, ids=[m for _, m in BAD])
def test_bad_outputs_are_one_line_user_errors(out, message):
    with pytest.raises(gdw.UserError, match=message) as err:
        logits_of(out)
    assert "\n" not in str(err.value)


class Returns(nn.Module):
    def __init__(self, value_fn):
        super().__init__()
        self.fc = nn.Linear(6, C).double()
        self.value_fn = value_fn

    def forward(self, x):
        return self.value_fn(self.fc(x))


@pytest.mark.parametrize("name", ["ce", "l2rw", "mwnet", "gdw"])
@pytest.mark.parametrize("value_fn,kw,message", [
    (lambda z: {"scores": z}, {}, "got dict without a 'logits' key"),
    (lambda z: "logits", {}, "got str"),
    (lambda z: (z,), {"output": lambda out: out[3]}, "output= could not take the logits .*IndexError"),
    (lambda z: (z,), {"output": lambda out: out[0].tolist()}, "output= must return the logits as a torch.Tensor, got list"),
])
def test_bad_model_outputs_raise_in_backward(name, value_fn, kw, message):
    x, y = make_batch("mlp", 8, 1)
    xm, ym = make_batch("mlp", 6, 2)
    method = gdw.make(name, Returns(value_fn), C, **kw)
    with pytest.raises(gdw.UserError, match=message) as err:
        method.backward(x, y, xm, ym, inner_lr=LR)
    assert "\n" not in str(err.value)


def test_output_must_be_callable():
    with pytest.raises(gdw.UserError, match="output must be None or a callable.*got int"):
        gdw.make("gdw", make_model("mlp"), C, output=1)


@pytest.mark.parametrize("form", list(FORMS))
def test_check_logits_accepts_every_form(form):
    model = Wrapped(make_model("mlp").float(), form)
    check_logits(model, (6,), C, output=FORMS[form].get("output"))
    with pytest.raises(gdw.UserError, match=r"logits of shape \(B, 5\)"):
        check_logits(model, (6,), 5, output=FORMS[form].get("output"))


def test_check_logits_names_a_bad_output():
    with pytest.raises(gdw.UserError, match="got dict without a 'logits' key"):
        check_logits(Returns(lambda z: {"scores": z}).float(), (6,), C)


class FeaturesFirst(nn.Module):
    """Returns ``(features, logits)``: the logits are not first."""

    def __init__(self):
        super().__init__()
        self.body, self.fc = nn.Linear(6, 16).double(), nn.Linear(16, C).double()

    def forward(self, x):
        h = self.body(x)
        return h, self.fc(h)


@pytest.mark.parametrize("name", ["ce", "gdw"])
def test_logits_second_in_a_tuple_name_output(name):
    x, y = make_batch("mlp", 8, 1)
    xm, ym = make_batch("mlp", 6, 2)
    with pytest.raises(gdw.UserError, match=r"got \(\d+, 16\).*output=lambda out: out\[1\]") as err:
        gdw.make(name, FeaturesFirst(), C).backward(x, y, xm, ym, inner_lr=LR)
    assert "\n" not in str(err.value)
    gdw.make(name, FeaturesFirst(), C, output=lambda out: out[1]).backward(x, y, xm, ym, inner_lr=LR)
    with pytest.raises(gdw.UserError, match=r"first element of its tuple output: return the logits first.*output="):
        check_logits(FeaturesFirst().float(), (6,), C)
