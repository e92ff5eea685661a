"""The few-shot benchmark's per-method settings (``--options``): parsed, checked, merged."""

from __future__ import annotations

from argparse import Namespace

import pytest

from conftest import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("fewshot_omniglot")


def test_options_parse_and_merge(bench):
    opts = bench.parse_options(
        "meta-lstm+pretrained:grad_scale=none; meta-lstm+pretrained@5w5s:inner_steps=15,steps=900"
    )
    args = Namespace(options=opts)
    assert bench.options_for(args, "meta-lstm+pretrained", "5w1s") == {"grad_scale": "none"}
    # the configuration-specific entry adds to (and overrides) the method-wide one
    assert bench.options_for(args, "meta-lstm+pretrained", "5w5s") == {
        "grad_scale": "none",
        "inner_steps": 15,
        "steps": 900,
    }
    assert bench.options_for(args, "maml", "5w1s") == {}
    assert bench.parse_options("") == {}


@pytest.mark.parametrize("word, value", [("true", True), ("Yes", True), ("0", False)])
def test_options_switch(bench, word, value):
    opts = bench.parse_options(f"meta-lstm:second_order={word}")
    assert opts == {("meta-lstm", None): {"second_order": value}}


@pytest.mark.parametrize(
    "text, message",
    [
        ("meta-lstm", "expected METHOD"),
        ("meta-lstm@7w2s:inner_steps=3", "unknown configuration '7w2s'"),
        ("meta-lstm:lr=3", "'lr=3' is not key=value"),
        ("meta-lstm:inner_steps=three", "inner_steps expects int, got 'three'"),
        ("meta-lstm:grad_scale=half", "grad_scale is one of"),
        ("meta-lstm:second_order=maybe", "second_order expects true or false, got 'maybe'"),
    ],
)
def test_options_errors(bench, text, message):
    with pytest.raises(ValueError, match=message):
        bench.parse_options(text)


def test_options_for_unknown_method_is_a_usage_error(bench, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--methods", "maml", "--options", "meta-lstm:inner_steps=3"])
    assert e.value.code == 2
    assert "--options: ['meta-lstm'] not among --methods" in capsys.readouterr().err


def test_options_a_method_does_not_have_are_a_usage_error(bench, capsys):
    # MAML has no learned rule: second_order there would be ignored without a word
    with pytest.raises(SystemExit) as e:
        bench.main(["--methods", "maml,finetune", "--options", "maml:second_order=true"])
    assert e.value.code == 2
    assert "maml has no setting second_order (only ('meta-lstm',))" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        bench.main(["--methods", "fomaml", "--options", "fomaml:init_lr_scale=0.1"])
    assert "fomaml has no setting init_lr_scale (only ('meta-lstm',))" in capsys.readouterr().err
    opts = bench.parse_options("meta-lstm+pretrained@5w5s:init_lr_scale=0.1")
    assert opts == {("meta-lstm+pretrained", "5w5s"): {"init_lr_scale": 0.1}}
