"""``gdw.fit`` and ``gdw.cycle`` as a library user calls them."""

from types import SimpleNamespace

import pytest
import torch

import gdw
from gdw.data import prepare
from gdw.distributed import Comm
from gdw.fit import TrainingDiverged, cosine_lr


@pytest.fixture(scope="module")
def digits():
    return prepare("digits", noise="uniform:0.4", meta_per_class=10, seed=0)


def small_model(C=10):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, C))


class Recorder:
    """Every hook call, in order, with what it saw."""

    def __init__(self):
        self.calls = []

    def on_fit_start(self, state):
        self.calls.append(("fit_start", state.epoch))

    def on_epoch_start(self, state):
        self.calls.append(("epoch_start", state.epoch, state.optimizer.param_groups[0]["lr"]))

    def on_step(self, state, pos, stats):
        self.calls.append(("step", state.epoch, len(pos)))

    def on_epoch_end(self, state):
        self.calls.append(("epoch_end", state.epoch, dict(state.row)))

    def on_fit_end(self, state):
        self.calls.append(("fit_end", len(state.history)))


def test_fit_calls_every_hook_in_order_and_sets_the_schedule(digits):
    model = small_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = Recorder()
    history = gdw.fit(model, gdw.make("gdw", model, 10, finetune_fraction=0), digits, opt, epochs=3, lr=0.2, batch_size=200,
                      callbacks=[rec], comm=Comm.single())
    kinds = [c[0] for c in rec.calls]
    steps = -(-len(digits.train) // 200)
    assert kinds == ["fit_start"] + (["epoch_start"] + ["step"] * steps + ["epoch_end"]) * 3 + ["fit_end"]
    lrs = [c[2] for c in rec.calls if c[0] == "epoch_start"]
    assert lrs == pytest.approx([cosine_lr(0.2, e, 3) for e in range(3)])
    assert sum(c[2] for c in rec.calls if c[0] == "step" and c[1] == 0) == len(digits.train)  # every example once
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert all(h["meta_loss"] is not None and h["train_loss"] > 0 for h in history)
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_fit_resumes_from_a_start_epoch_with_the_same_batches(digits):
    """Epochs 2–3 after a restart at epoch 2 equal those of an uninterrupted
    run: batch order and meta batches depend only on (seed, epoch)."""
    def fresh():
        model = small_model()
        return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    model, opt = fresh()
    full = gdw.fit(model, gdw.make("ce", model, 10), digits, opt, epochs=3, lr=0.1)

    class Stop(Exception):
        pass

    class StopAfterFirstEpoch:
        def on_epoch_end(self, state):
            raise Stop

    model, opt = fresh()
    with pytest.raises(Stop):
        gdw.fit(model, gdw.make("ce", model, 10), digits, opt, epochs=3, lr=0.1, callbacks=[StopAfterFirstEpoch()])
    saved = (model.state_dict(), opt.state_dict())
    model, opt = fresh()
    model.load_state_dict(saved[0])
    opt.load_state_dict(saved[1])
    rest = gdw.fit(model, gdw.make("ce", model, 10), digits, opt, epochs=3, lr=0.1, start_epoch=1, history=full[:1])
    assert [h["epoch"] for h in rest] == [1, 2, 3]
    assert [h["train_loss"] for h in rest] == pytest.approx([h["train_loss"] for h in full], rel=1e-6)


def test_fit_stops_on_a_non_finite_loss(digits):
    model = small_model()
    with torch.no_grad():
        model[-1].weight.fill_(float("nan"))
    with pytest.raises(TrainingDiverged, match="non-finite"):
        gdw.fit(model, gdw.make("ce", model, 10), digits, torch.optim.SGD(model.parameters(), lr=0.1), epochs=1, lr=0.1)


def test_cycle_restarts_a_loader_that_runs_out():
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.arange(5)), batch_size=2, shuffle=False)
    train = range(7)
    pairs = list(zip(train, gdw.cycle(loader)))
    assert len(pairs) == 7  # zip(train, loader) would stop after 3
    assert [p[1][0].tolist() for p in pairs] == [[0, 1], [2, 3], [4], [0, 1], [2, 3], [4], [0, 1]]
    with pytest.raises(ValueError, match="no batch"):
        next(gdw.cycle([]))


def test_fit_takes_a_split_without_meta_set(digits):
    model = small_model()
    data = SimpleNamespace(train=digits.train, meta=None)
    history = gdw.fit(model, gdw.make("ce", model, 10), data, torch.optim.SGD(model.parameters(), lr=0.1),
                      epochs=1, lr=0.1)
    assert history[0]["meta_loss"] is None


def test_the_readme_own_loop_runs_and_sees_every_batch():
    """The README's own-loop example, executed as written, on DataLoaders
    whose meta loader is much shorter than the training loader."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"## In your own training loop\n\n```python\n(.*?)```", text, re.S).group(1)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(120, 6, generator=g), torch.randint(0, 10, (120,), generator=g)
    seen = []

    class Counting(torch.utils.data.TensorDataset):
        def __getitem__(self, i):
            seen.append(i)
            return super().__getitem__(i)

    train_loader = torch.utils.data.DataLoader(Counting(x, y), batch_size=10, shuffle=True)
    meta_loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:20], y[:20]), batch_size=10)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 2)
    before = [p.detach().clone() for p in model.parameters()]
    scope = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "epochs": 2,
             "train_loader": train_loader, "meta_loader": meta_loader, "train_labels": y, "print": lambda *a: None}
    exec(code, scope)
    # every training example in the first epoch, not 2 batches (the meta loader's length); the second
    # epoch is GDW's fine-tuning epoch: one pass over the meta loader, no training batch
    assert len(seen) == 120
    # GDW's default ends with fine-tuning on the meta set: the last epoch's Stats describe meta batches
    assert scope["w"].finetuning and scope["stats"].trained_on == "meta" and scope["stats"].weights.shape == (10,)
    assert not torch.equal(before[0], model[0].weight)
    counts = torch.bincount(y, minlength=10).double()  # the logit adjustment took the counts given
    torch.testing.assert_close(scope["w"].log_prior, (counts / counts.sum()).log())


@pytest.mark.parametrize("name", ["ce", "dm", "gce", "mwnet"])
def test_the_readme_own_loop_runs_with_any_method(name):
    """The README's loop with another method, those without a meta set
    (meta_loss None) included: it prints the loss and the weights' shape."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"## In your own training loop\n\n```python\n(.*?)```", text, re.S).group(1)
    made = "gdw.GDW(model, num_classes=10, optimizer=optimizer, class_counts=counts)"
    assert made in code
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 6, generator=g), torch.randint(0, 10, (40,), generator=g)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=10)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    printed = []
    scope = {"model": model, "optimizer": optimizer, "scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 1),
             "epochs": 1, "train_loader": loader, "meta_loader": loader, "train_labels": y,
             "print": lambda *a: printed.append(a)}
    exec(code.replace(made, f"gdw.make({name!r}, model, 10, optimizer=optimizer)"), scope)
    assert printed == [(float(scope["stats"].loss), (10,))]


def test_the_epoch_line_shows_the_plain_cross_entropy_on_the_given_labels(digits):
    """GDW's loss in the epoch line is no weighted loss: it is the mean plain
    cross-entropy of the logits trained on against the (noisy) labels given,
    worked out here from every step's logits, and the line says so."""
    import re

    from gdw.callbacks import EpochLog

    model = small_model()
    terms, lines = [], []

    class PlainCE:
        def on_step(self, state, pos, stats):
            y = digits.train.labels[pos]
            terms.append(-stats.logits.double().log_softmax(1).gather(1, y[:, None]).sum())

    gdw.fit(model, gdw.make("gdw", model, 10, finetune_fraction=0), digits, torch.optim.SGD(model.parameters(), lr=0.1),
            epochs=1, lr=0.1, callbacks=[PlainCE(), EpochLog(lines.append)])
    shown = float(re.search(r"CE on the given labels (\d+\.\d+)", lines[0]).group(1))
    assert shown == pytest.approx(float(sum(terms)) / len(digits.train), abs=1e-4)


def test_a_fine_tuning_epoch_is_one_pass_over_the_meta_set(digits):
    """fit(): in finetune_fraction's epochs the steps are the meta set's
    batches, once each, not as many steps as the training set has."""
    model = small_model()
    rec = Recorder()
    method = gdw.make("ce", model, 10, finetune_fraction=0.5)
    gdw.fit(model, method, digits, torch.optim.SGD(model.parameters(), lr=0.1), epochs=2, lr=0.1, batch_size=100,
            meta_batch_size=30, callbacks=[rec])
    sizes = {e: [c[2] for c in rec.calls if c[0] == "step" and c[1] == e] for e in (0, 1)}
    assert sum(sizes[0]) == len(digits.train)  # a training epoch
    assert sum(sizes[1]) == len(digits.meta) and max(sizes[1]) == 30  # one pass over the meta set


def test_each_row_counts_its_steps(digits):
    """steps: training batches in a training epoch, meta batches in a
    fine-tuning epoch (the summary's steps_per_second is built on them)."""
    model = small_model()
    history = gdw.fit(model, gdw.make("ce", model, 10, finetune_fraction=0.5), digits,
                      torch.optim.SGD(model.parameters(), lr=0.1), epochs=2, lr=0.1, batch_size=100,
                      meta_batch_size=30)
    assert [h["steps"] for h in history] == [-(-len(digits.train) // 100), -(-len(digits.meta) // 30)]
