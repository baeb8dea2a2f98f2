"""gdw.integrations.lightning.WeightedModule: a tiny BERT built from a config
(no download) trains for a few epochs through ``lightning.Trainer`` with
manual optimisation, and its first step leaves exactly the ``.grad`` of
``method.backward`` on the same batch and meta batch."""

import copy

import pytest
import torch

import gdw

lightning = pytest.importorskip("lightning")
transformers = pytest.importorskip("transformers")
from gdw.integrations.lightning import WeightedModule  # noqa: E402

from text_models import tiny_bert as bert, token_rows  # noqa: E402

C = 3


def tiny_bert():
    return bert(C)


def rows(n, seed):
    return token_rows(n, seed, C)


class FirstStep(lightning.Callback):
    """A copy of the model and the method before the first step, and the
    gradient the step hands the optimizer."""

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == 0 and trainer.current_epoch == 0:
            self.twin = copy.deepcopy((module.model, module.method))
            self.batch = batch

    def on_before_optimizer_step(self, trainer, module, optimizer):
        if not hasattr(self, "grads"):
            self.grads = [p.grad.clone() for p in module.model.parameters()]
            self.lr = optimizer.param_groups[0]["lr"]


@pytest.mark.parametrize("name", ["gdw", "mwnet", "l2rw"])
def test_trains_and_leaves_the_gradient_of_backward(name):
    model = tiny_bert()
    method = gdw.make(name, model, C)
    start = [p.detach().clone() for p in model.parameters()]
    # the whole meta set in one batch, unshuffled: every step's meta batch is the same
    meta_loader = torch.utils.data.DataLoader(rows(9, 2), batch_size=9)
    module = WeightedModule(model, method, meta_loader, optimizer=lambda p: torch.optim.SGD(p, lr=0.05))
    first = FirstStep()
    trainer = lightning.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False, callbacks=[first])
    train = torch.utils.data.DataLoader(rows(16, 1), batch_size=4, shuffle=True)
    trainer.fit(module, train, torch.utils.data.DataLoader(rows(8, 3), batch_size=4))
    assert trainer.global_step == 8
    assert any(not torch.equal(a, b) for a, b in zip(start, model.parameters()))
    logged = trainer.logged_metrics
    assert {"train_loss_epoch", "gdw_weight_mean_epoch", "gdw_trust_mean_epoch", "val_loss",
            "val_accuracy"} <= set(logged)
    assert ("gdw_meta_loss_epoch" in logged) == method.needs_meta

    twin_model, twin_method = first.twin
    batch = first.batch
    meta = next(iter(meta_loader))
    x = {k: v for k, v in batch.items() if k != "labels"}
    xm = {k: v for k, v in meta.items() if k != "labels"}
    twin_method.backward(x, batch["labels"], xm, meta["labels"], inner_lr=first.lr)
    for (n, p), g in zip(twin_model.named_parameters(), first.grads):
        torch.testing.assert_close(g, p.grad, rtol=0, atol=0, msg=f"gradient of {n}")


def test_refuses_a_method_on_another_model():
    with pytest.raises(gdw.UserError, match="same object"):
        WeightedModule(tiny_bert(), gdw.make("ce", tiny_bert(), C))
    with pytest.raises(gdw.UserError, match="meta_loader"):
        model = tiny_bert()
        WeightedModule(model, gdw.make("l2rw", model, C))
