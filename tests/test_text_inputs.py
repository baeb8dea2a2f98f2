"""Inputs that are not one tensor: a dict of keyword arguments (a
tokenizer's ``input_ids`` and ``attention_mask``) or a tuple of positional
ones, through ``backward``, every ``meta_grad`` mode, ``head_only``,
``low_memory``, ``gdw.batches`` and ``gdw.fit``.

The model is a tiny BERT built from a config (no download), in float64, with
padding in both batches. The reference is the independent create_graph one
of test_engine_exact, run on a wrapper that takes the same ids and mask
packed into one tensor, so it never goes through gdw's handling of dicts.
"""

import copy
import types

import pytest
import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import gdw
from gdw.fit import evaluate
from gdw.inputs import InputSplit, take
from models import C
from test_engine_exact import BM, B, LR, reference, run_method

transformers = pytest.importorskip("transformers")
import text_models  # noqa: E402

L = 7  # tokens per example
# relative error of .grad and the weights, fd against the exact gradient in float64
# (test_meta_grad_fd's GRAD_TOL)
FD_TOL = 1.5e-6


def tiny_bert(seed=0):
    # in float64; BERT's initializer_range 0.02 would leave the logits near zero
    return text_models.tiny_bert(C, seed, initializer_range=0.3).double()


def text_batch(n, seed):
    """``({"input_ids", "attention_mask"}, y)``: every other row padded after a random length."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 50, (n, L), generator=g)
    mask = torch.ones(n, L, dtype=torch.long)
    for i in range(0, n, 2):
        keep = int(torch.randint(2, L, (1,), generator=g))
        mask[i, keep:] = 0
        ids[i, keep:] = 0  # the pad token
    return {"input_ids": ids, "attention_mask": mask}, torch.randint(0, C, (n,), generator=g)


class Packed(nn.Module):
    """The same BERT on one tensor (B, 2, L): ids and mask stacked."""

    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def forward(self, packed):
        return self.bert(input_ids=packed[:, 0], attention_mask=packed[:, 1]).logits


def pack(x):
    return torch.stack([x["input_ids"], x["attention_mask"]], 1)


def test_the_mask_matters():
    """The padding changes the logits, so the mask really reaches the model."""
    model = tiny_bert()
    x, _ = text_batch(B, 1)
    with torch.no_grad():
        masked = model(**x).logits
        unmasked = model(input_ids=x["input_ids"]).logits
    assert float((masked - unmasked)[0::2].abs().max()) > 1e-3


@pytest.mark.parametrize("mode", ["jvp", "fd", "double"])
@pytest.mark.parametrize("name", ["gdw", "mwnet", "l2rw"])
def test_dict_inputs_match_create_graph_reference(name, mode):
    """One step of GDW (the paper's algorithm), MW-Net and L2RW on the tiny
    BERT with dict inputs and a ModelOutput equals the reference: 1e-8 for
    the exact modes, fd within test_meta_grad_fd's tolerance."""
    model = tiny_bert()
    x, y = text_batch(B, 1)
    xm, ym = text_batch(BM, 2)
    kw = {"meta_grad": mode}
    if name == "gdw":
        kw.update(eta=3.0, stage_one="mwnet")
    before = Packed(copy.deepcopy(model))
    method, vnet0, stats = run_method(name, model, x, y, xm, ym, **kw)
    with sdpa_kernel(SDPBackend.MATH):  # the fused kernels have no derivative of their backward
        w_ref, g_ref, V_ref = reference(name, before, vnet0, pack(x), y, pack(xm), ym, eta=kw.get("eta"))
    grads = [p.grad for p in model.parameters()]
    assert len(grads) == len(g_ref)
    if mode == "fd":
        flat, flat_ref = torch.cat([g.flatten() for g in grads]), torch.cat([g.flatten() for g in g_ref])
        assert float((flat - flat_ref).norm() / flat_ref.norm()) < FD_TOL
        assert float((stats.weights - w_ref).norm() / w_ref.norm()) < FD_TOL
        return
    torch.testing.assert_close(stats.weights, w_ref.detach(), rtol=1e-8, atol=1e-8)
    for (n, p), g in zip(model.named_parameters(), g_ref):
        torch.testing.assert_close(p.grad, g, rtol=1e-8, atol=1e-8, msg=f"gradient of {n}")
    if V_ref is not None:
        for a, b in zip(method.vnet.parameters(), V_ref.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8)


SETTINGS = [{"meta_grad": m} for m in ("jvp", "double", "fd", "fd_central")] + [
    {"meta_grad": "jvp", "head_only": True}, {"meta_grad": "double", "head_only": True},
    {"meta_grad": "jvp", "low_memory": True}, {"meta_grad": "fd", "low_memory": True}]


@pytest.mark.parametrize("form", ["dict", "tuple", "list"])
@pytest.mark.parametrize("kw", SETTINGS, ids=lambda kw: "-".join(str(v) for v in kw.values()))
@pytest.mark.parametrize("name", ["gdw", "mwnet", "l2rw"])
def test_every_mode_takes_a_dict_or_a_tuple(name, kw, form):
    """Every meta_grad, head_only and low_memory (GDW at its defaults: the
    L2RW stage one and the held-out guard, which halves the meta batch) give
    the same step on dict or tuple inputs as on the packed tensor, over two
    optimizer steps."""
    results = []
    for packed in (True, False):
        bert = tiny_bert()
        model = Packed(bert) if packed else bert
        opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
        method = gdw.make(name, model, C, optimizer=opt, **kw)
        if getattr(method, "vnet", None) is not None:
            method.vnet.double()
        for step in range(2):
            x, y = text_batch(B, 10 + step)
            xm, ym = text_batch(BM, 20 + step)
            if packed:
                x, xm = pack(x), pack(xm)
            elif form != "dict":
                x, xm = ((x["input_ids"], x["attention_mask"]), (xm["input_ids"], xm["attention_mask"]))
                if form == "list":
                    x, xm = list(x), list(xm)
            opt.zero_grad()
            stats = method.backward(x, y, xm, ym)
            opt.step()
        results.append(([p.grad.clone() for p in model.parameters()], stats.weights, stats.meta_loss))
    (g_packed, w_packed, m_packed), (g_dict, w_dict, m_dict) = results
    torch.testing.assert_close(w_dict, w_packed, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m_dict, m_packed, rtol=1e-12, atol=1e-12)
    for a, b in zip(g_dict, g_packed):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_input_errors_name_the_problem():
    model = tiny_bert()
    method = gdw.make("l2rw", model, C)
    x, y = text_batch(B, 1)
    xm, ym = text_batch(BM, 2)
    with pytest.raises(gdw.UserError, match=r"8 inputs but 7 labels"):
        method.backward(x, y[:7], xm, ym, inner_lr=LR)
    with pytest.raises(gdw.UserError, match=r"first dimensions differ \(input_ids: \(8, 7\), attention_mask: \(7, 7\)"):
        method.backward({**x, "attention_mask": x["attention_mask"][:7]}, y, xm, ym, inner_lr=LR)
    with pytest.raises(gdw.UserError, match="holds no tensor"):
        method.backward({"flag": True}, y, xm, ym, inner_lr=LR)
    with pytest.raises(gdw.UserError, match="meta batch is empty"):
        method.backward(x, y, take(xm, slice(0, 0)), ym[:0], inner_lr=LR)
    with pytest.raises(gdw.UserError, match="a dict of tensors .* or a tuple"):
        method.backward("some text", y, xm, ym, inner_lr=LR)
    bad = {"inputs_embeds": torch.full((B, L, 16), float("nan"), dtype=torch.float64)}
    with pytest.raises(gdw.UserError, match="NaN"):
        method.backward(bad, y, xm, ym, inner_lr=LR)


def test_batches_splits_a_collated_dict_and_fit_trains_on_dict_inputs():
    """``gdw.batches`` takes a loader of dicts with ``labels`` (what a Hugging
    Face collator yields) or of ``(inputs, labels)``; ``gdw.fit`` trains on
    :class:`gdw.inputs.InputSplit` sets of dict inputs and evaluates them."""
    x, y = text_batch(40, 3)
    xm, ym = text_batch(12, 4)
    rows = [{"input_ids": x["input_ids"][i], "attention_mask": x["attention_mask"][i], "labels": y[i]}
            for i in range(len(y))]
    loader = torch.utils.data.DataLoader(rows, batch_size=8)
    meta_loader = torch.utils.data.DataLoader(list(zip([take(xm, slice(i, i + 1)) for i in range(12)], ym)),
                                              batch_size=5, collate_fn=lambda b: ({k: torch.cat([r[0][k] for r in b])
                                                                                   for k in b[0][0]},
                                                                                  torch.stack([r[1] for r in b])))
    model = tiny_bert()
    method = gdw.make("gdw", model, C)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    n = 0
    for xb, yb, xmb, ymb in gdw.batches(method, loader, meta_loader):
        assert set(xb) == {"input_ids", "attention_mask"} and set(xmb) == {"input_ids", "attention_mask"}
        assert yb.shape == (8,) and ymb.shape[0] in (5, 2)
        opt.zero_grad()
        method.backward(xb, yb, xmb, ymb, inner_lr=0.1)
        opt.step()
        n += 1
    assert n == 5

    y, ym = x["input_ids"][:, 0] % C, xm["input_ids"][:, 0] % C  # labels that can be learned
    model = tiny_bert()
    method = gdw.make("gdw", model, C)
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    data = types.SimpleNamespace(train=InputSplit(x, y), meta=InputSplit(xm, ym, name="meta"), classes=list("abcd"))
    before = evaluate(model, data.train, C)
    history = gdw.fit(model, method, data, opt, epochs=3, lr=0.02, batch_size=10, meta_batch_size=6)
    # GDW's last epoch fine-tunes on the meta set: one pass over its 12 examples
    assert [(h["steps"], h["finetuning"]) for h in history] == [(4, False), (4, False), (2, True)]
    assert all(h["meta_loss"] is not None for h in history)
    after = evaluate(model, data.train, C)
    assert after["loss"] < before["loss"]
