"""gdw.Callback: no-op hooks to override; fit calls them in order; every built-in
callback is one."""

import torch

import gdw
from gdw import callbacks
from gdw.recorder import LabelIssueRecorder
from gdw.data import prepare


def test_a_callback_overrides_only_what_it_needs_and_fit_calls_the_hooks_in_order():
    calls = []

    class Counter(gdw.Callback):
        def on_epoch_start(self, state):
            calls.append(("start", state.epoch))

        def on_step(self, state, pos, stats):
            calls.append(("step", len(pos)))

        def on_epoch_end(self, state):
            calls.append(("end", state.epoch, round(state.row["train_loss"], 6) > 0))

    data = prepare("digits", meta_per_class=0, seed=0)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    method = gdw.make("ce", model, 10)
    gdw.fit(model, method, data, torch.optim.SGD(model.parameters(), lr=0.1), epochs=2, lr=0.1,
            batch_size=500, callbacks=[Counter()])
    steps = -(-len(data.train) // 500)
    expected = []
    for epoch in range(2):
        expected += [("start", epoch)] + [("step", n) for n in [500] * (steps - 1) + [len(data.train) - 500 * (steps - 1)]]
        expected.append(("end", epoch, True))
    assert calls == expected
    base = gdw.Callback()
    assert base.state_dict() == {} and base.load_state_dict({}) is None and base.name is None


def test_the_built_in_callbacks_are_callbacks_and_the_stateful_ones_are_named():
    for cls in (callbacks.Evaluator, callbacks.WeightStats, callbacks.Checkpointer, callbacks.MetricsWriter,
                callbacks.EpochLog, callbacks.BestModel, callbacks.Plots, callbacks.LabelIssues, LabelIssueRecorder):
        assert issubclass(cls, gdw.Callback), cls
    assert callbacks.BestModel.name == "best_model" and LabelIssueRecorder.name == "label_issues"
