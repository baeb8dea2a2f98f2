"""The one table of method variants: a method's name is the method at its
defaults, a label of the table its entry, ``-head`` either on the output
layer only; ``gdw compare`` runs the table's labels too."""

import json

import pytest

from gdw.errors import UserError
from gdw.methods import resolved_params
from gdw.variants import VARIANTS, pick, variant


def test_labels_resolve_to_one_entry_each():
    assert variant("gdw") == ("gdw", {}, False) and variant("l2rw-head") == ("l2rw", {}, True)
    assert variant("gdw-paper-head") == ("gdw", {"stage_one": "mwnet"}, True)
    assert variant("gdw-raw") == VARIANTS["gdw-raw"]
    # the table's gdw writes out the defaults that the method's name runs; gdw-paper's two spellings are one run
    assert resolved_params("gdw", VARIANTS["gdw"][1]) == resolved_params("gdw", {})
    assert resolved_params("gdw", VARIANTS["gdw-paper"][1]) == resolved_params("gdw", VARIANTS["gdw-paper-ft0"][1])
    assert pick(["ce", "gdw", "gdw-paper"], {"gdw-paper": "gdw-paper-ft0"}) == {
        "ce": ("ce", {}, False), "gdw": VARIANTS["gdw"], "gdw-paper": VARIANTS["gdw-paper-ft0"]}
    with pytest.raises(UserError, match="unknown method 'nope'"):
        variant("nope")


def test_compare_runs_a_named_variant(tmp_path, capsys):
    from gdw.cli import main

    assert main(["compare", "--dataset", "digits", "--meta-per-class", "10", "--no-progress", "--epochs", "1",
                 "--methods", "l2rw-ft", "--out", str(tmp_path)]) == 0
    config = json.loads((tmp_path / "none_none_l2rw-ft_s0" / "config.json").read_text())
    assert config["method"] == "l2rw" and config["method_args"] == {"finetune_fraction": 0.2}
    assert "| l2rw-ft |" in (tmp_path / "results.md").read_text()
