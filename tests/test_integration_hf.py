"""gdw.integrations.hf.WeightedTrainer: a tiny BERT built from a config (no
download) trains for a few steps through ``transformers.Trainer``, and a
step leaves exactly the ``.grad`` of ``method.backward`` on the same batch
and meta batch."""

import copy

import pytest
import torch

import gdw

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from gdw.integrations.hf import WeightedTrainer  # noqa: E402

from text_models import tiny_bert as bert, token_rows  # noqa: E402

C = 3


def tiny_bert():
    return bert(C)


def rows(n, seed):
    return token_rows(n, seed, C)


def trainer_for(tmp_path, method, model, **kw):
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=kw.pop("max_steps", 4),
                                          per_device_train_batch_size=4, learning_rate=0.05, logging_steps=1,
                                          report_to="none", save_strategy="no", use_cpu=True, seed=0,
                                          disable_tqdm=True, **kw)
    return WeightedTrainer(model=model, args=args, train_dataset=rows(24, 1), meta_dataset=rows(9, 2),
                           data_collator=transformers.default_data_collator, method=method)


def test_trains_and_logs_the_weights(tmp_path):
    model = tiny_bert()
    start = [p.detach().clone() for p in model.parameters()]
    trainer = trainer_for(tmp_path, "gdw", model)
    assert isinstance(trainer.method, gdw.GDW) and trainer.method.model is model
    result = trainer.train()
    assert result.global_step == 4
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 4
    for h in logged:
        assert h["loss"] > 0 and h["gdw_meta_loss"] > 0
        assert 0 <= h["gdw_trust_mean"] and 0 < h["gdw_weight_mean"] and "gdw_instance_weight_mean" in h
    assert any(not torch.equal(a, b) for a, b in zip(start, model.parameters()))


@pytest.mark.parametrize("name", ["gdw", "mwnet", "l2rw"])
@pytest.mark.parametrize("accumulate", [1, 2])
def test_a_step_leaves_the_gradient_of_backward(tmp_path, name, accumulate):
    """The .grad after training_step equals method.backward's on the same
    batch and meta batch (on a copy of the model and the method); with two
    micro-batches of gradient accumulation, the mean of the two."""
    model = tiny_bert()
    method = gdw.make(name, model, C, **({"meta_grad": "jvp"} if name == "gdw" else {}))
    trainer = trainer_for(tmp_path, method, model, gradient_accumulation_steps=accumulate)
    trainer.create_optimizer_and_scheduler(num_training_steps=4)
    twin_model, twin_method = copy.deepcopy((model, method))
    lr = trainer.optimizer.param_groups[0]["lr"]
    assert lr == pytest.approx(0.05)
    trainer.current_gradient_accumulation_steps = accumulate
    batches = iter(trainer.get_train_dataloader())
    model.zero_grad(set_to_none=True)
    expected = None
    for _ in range(accumulate):
        batch = next(batches)
        meta = trainer.next_meta_batch()
        trainer.next_meta_batch = lambda meta=meta: meta
        loss = trainer.training_step(trainer.model, dict(batch))
        x = {k: v for k, v in batch.items() if k != "labels"}
        twin_model.zero_grad(set_to_none=True)
        stats = twin_method.backward(x, batch["labels"], meta[0], meta[1], inner_lr=lr)
        grads = [p.grad.clone() / accumulate for p in twin_model.parameters()]
        expected = grads if expected is None else [a + b for a, b in zip(expected, grads)]
        assert not loss.requires_grad
        torch.testing.assert_close(loss, stats.loss / accumulate, rtol=0, atol=0)
    tol = 0 if accumulate == 1 else 1e-6  # accumulated: the sum's rounding differs
    for (n, p), g in zip(model.named_parameters(), expected):
        torch.testing.assert_close(p.grad, g, rtol=tol, atol=tol * 1e-3, msg=f"gradient of {n}")


def test_refuses_what_it_cannot_do(tmp_path):
    model = tiny_bert()
    with pytest.raises(gdw.UserError, match="meta_dataset"):
        WeightedTrainer(model=model, args=transformers.TrainingArguments(str(tmp_path), report_to="none",
                                                                         use_cpu=True),
                        train_dataset=rows(4, 1), method="l2rw")
    with pytest.raises(gdw.UserError, match="same object"):
        trainer_for(tmp_path, gdw.make("l2rw", tiny_bert(), C), model)
