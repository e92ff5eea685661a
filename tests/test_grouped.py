"""GroupedRule: routing by name pattern, exact equivalence to separate rules, meta-training, artifacts."""

import pytest
import tomllib
import torch
from torch import nn

import l2o
from l2o.config import resolve, to_toml
from l2o.errors import L2OError
from l2o.evaluate import compare, parse_optimizer
from l2o.meta import MetaTrainer, build_rule
from l2o.meta.unroll import run, start, unroll
from l2o.rules import SGD, Adam, CoordinatewiseLSTM, GroupedRule, LSTMRuleConfig, build_learned_rule
from l2o.tasks import ModuleTask, ParamLayout

LAYOUT = ParamLayout(
    ("conv.weight", "conv.bias", "fc.weight", "fc.bias", "scale"),
    ((3, 2, 3, 3), (3,), (4, 12), (4,), ()),
)


def small_lstm(seed: int = 0) -> CoordinatewiseLSTM:
    torch.manual_seed(seed)
    return CoordinatewiseLSTM(
        LSTMRuleConfig(layers=(5,), preprocessing="logsign", output_scale=0.1)
    )


def test_route_first_match_wins_and_every_tensor_has_one_rule():
    rule = GroupedRule([("conv.*", SGD(0.1)), ("*.bias", Adam(0.1)), ("*", small_lstm())])
    assert rule.route(LAYOUT.names) == [0, 0, 2, 1, 2]


def test_unmatched_tensor_is_an_error_naming_it_and_the_patterns():
    rule = GroupedRule([("conv.*", SGD(0.1)), ("fc.*", Adam(0.1))])
    with pytest.raises(L2OError, match=r"'scale'.*\['conv\.\*', 'fc\.\*'\]"):
        rule.init(torch.zeros(LAYOUT.numel), LAYOUT)


def test_pattern_matching_nothing_is_a_warning():
    rule = GroupedRule([("*conv*", SGD(0.1)), ("*", SGD(0.1))])
    with pytest.warns(UserWarning, match="match no parameter"):
        rule.init(torch.zeros(4), ParamLayout(("fc.weight",), ((2, 2),)))


def test_rule_without_a_layout_is_a_clear_error():
    rule = GroupedRule([("*", SGD(0.1))])
    with pytest.raises(L2OError, match="needs the layout"):
        rule.init(torch.zeros(5))
    with pytest.raises(L2OError, match="4 coordinates, the parameters 5"):
        rule.init(torch.zeros(5), ParamLayout(("a",), ((4,),)))


def test_two_layouts_of_the_same_size_keep_their_own_routing():
    # Plans are keyed by layout, not by size: the second layout must not replace the first.
    rule = GroupedRule([("a*", SGD(1.0)), ("*", SGD(0.5))])
    first = ParamLayout(("a", "b"), ((2,), (2,)))
    second = ParamLayout(("b", "a"), ((3,), (1,)))
    theta, grad = torch.zeros(4), torch.ones(4)
    new1, _ = rule.step(theta, grad, None, rule.init(theta, first), first)
    new2, _ = rule.step(theta, grad, None, rule.init(theta, second), second)
    new1b, _ = rule.step(theta, grad, None, {}, first)
    assert new1.tolist() == [-1.0, -1.0, -0.5, -0.5] == new1b.tolist()
    assert new2.tolist() == [-0.5, -0.5, -0.5, -1.0]


def test_labels_name_the_groups_and_their_state():
    rule = GroupedRule(
        {"conv": small_lstm(0), "fc": Adam(0.1)}, labels=[("conv.*", "conv"), ("*", "fc")]
    )
    theta = torch.randn(LAYOUT.numel)
    state = rule.init(theta, LAYOUT)
    assert {k.split(".")[0] for k in state} == {"conv", "fc"}
    assert "groups.conv.head.weight" in dict(rule.named_parameters())
    again = build_learned_rule("grouped", rule.describe()["config"])
    assert again.labels == rule.labels and again.label_names == ["conv", "fc"]
    with pytest.raises(ValueError, match="label 'other' has no rule"):
        GroupedRule({"conv": SGD(0.1)}, labels=[("*", "other")])


@pytest.mark.parametrize("interleaved", [False, True])
def test_grouped_step_equals_each_rule_on_its_own_coordinates(interleaved):
    patterns = ["*.bias", "*"] if interleaved else ["conv.*", "*"]
    lstm = small_lstm()
    rule = GroupedRule([(patterns[0], Adam(0.05)), (patterns[1], lstm)])
    torch.manual_seed(1)
    theta, n = torch.randn(LAYOUT.numel), LAYOUT.numel
    mask = torch.zeros(n, dtype=torch.bool)
    for name, sl in LAYOUT.slices().items():
        mask[sl] = rule.route([name], warn_unused=False)[0] == 0
    state = rule.init(theta, LAYOUT)
    assert {k.split(".")[0] for k in state} == {"g0", "g1"}
    assert state["g1.h0"].shape == (int((~mask).sum()), 5)
    ref_a, ref_l = theta[mask].clone(), theta[~mask].clone()
    sa, sl = Adam(0.05).init(ref_a), lstm.init(ref_l)
    for _ in range(4):
        grad = torch.sin(3 * theta)
        theta, state = rule.step(theta, grad, None, state, LAYOUT)
        ga, gl = torch.sin(3 * ref_a), torch.sin(3 * ref_l)
        ref_a, sa = Adam(0.05).step(ref_a, ga, None, sa)
        ref_l, sl = lstm.step(ref_l, gl, None, sl)
        assert torch.equal(theta[mask], ref_a)
        assert torch.equal(theta[~mask], ref_l)


def test_grouped_rule_is_differentiable_in_its_sub_rules_weights():
    a, b = small_lstm(0), small_lstm(1)
    rule = GroupedRule([("conv.*", a), ("*", b)])
    theta = torch.randn(LAYOUT.numel)
    new, _ = rule.step(theta, torch.randn_like(theta), None, rule.init(theta, LAYOUT), LAYOUT)
    new.square().sum().backward()
    assert a.head.weight.grad is not None and b.head.weight.grad is not None
    names = {n for n, _ in rule.named_parameters()}
    assert "groups.g0.head.weight" in names and "groups.g1.head.weight" in names


def test_describe_round_trips_through_the_registry():
    rule = GroupedRule([("conv.*", small_lstm(0)), ("*", Adam(lr=0.01, b1=0.8))])
    desc = rule.describe()
    assert desc["config"]["labels"] == [["conv.*", "g0"], ["*", "g1"]]
    assert desc["config"]["rules"]["g1"] == {
        "rule": "adam",
        "config": {"lr": 0.01, "b1": 0.8, "b2": 0.999, "eps": 1e-8},
    }
    again = build_learned_rule(desc["rule"], desc["config"])
    assert again.describe() == desc
    with pytest.raises(ValueError, match="unknown keys"):
        build_learned_rule("grouped", {"groups": [{"pattern": "*", "rule": "sgd", "lr": 1}]})


# -- meta-training, artifacts, compare ------------------------------------------------------


def mlp_task() -> ModuleTask:
    def batch_fn(seed, t):
        g = torch.Generator().manual_seed((seed * 1000 + t) % 2**62)
        x = torch.randn(16, 4, generator=g)
        return x, x[:, :1] * 2 - x[:, 1:2]

    return ModuleTask(
        lambda: nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)),
        nn.functional.mse_loss,
        batch_fn,
        name="tiny-mlp",
    )


def tiny_config(*sets):
    return resolve(
        "quadratic",
        sets=[
            "train.meta_steps=2",
            "train.horizon=4",
            "train.unroll=2",
            "train.instances=1",
            "val.every=2",
            "val.problems=2",
            *sets,
        ],
    )


def test_grouped_rule_meta_trains_and_its_artifact_round_trips(tmp_path):
    rule = GroupedRule([("0.*", small_lstm(0)), ("*.weight", small_lstm(1)), ("*", Adam(lr=0.01))])
    before = {k: v.clone() for k, v in rule.state_dict().items()}
    trainer = MetaTrainer(
        tiny_config(), tmp_path / "run", task=mlp_task(), rule=rule, progress=False
    )
    result = trainer.train()
    assert result["updates"] == 4 and result["skipped"] == 0
    after = rule.state_dict()
    assert all(not torch.equal(before[k], after[k]) for k in before if k.endswith("head.weight"))
    loaded = l2o.load(tmp_path / "run")
    assert isinstance(loaded, GroupedRule) and loaded.describe() == rule.describe()
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, after[k])
    # the loaded rule runs on a problem and gives the same losses as the trained one
    problem = mlp_task().sample([7])
    assert torch.equal(run(loaded, problem, 5), run(rule, problem, 5))
    # compare with the grouped artifact as a learned optimizer spec
    spec = parse_optimizer(f"grouped:{tmp_path / 'run'}")
    res = compare(
        mlp_task(), [spec, parse_optimizer("adam:lr=0.01")], steps=3, problems=2, log=lambda s: None
    )
    assert set(res["optimizers"]) == {spec.name, "adam:lr=0.01"}
    assert res["optimizers"][spec.name]["hparams"]["rule"] == "grouped"


def test_unroll_routes_and_the_meta_gradient_reaches_every_learned_group():
    a, b = small_lstm(0), small_lstm(1)
    rule = GroupedRule([("0.*", a), ("*", b)])
    traj = start(mlp_task().sample([3]), rule)
    meta_loss, losses, _ = unroll(rule, traj, 3)
    meta_loss.backward()
    assert losses.shape == (3, 1)
    assert a.head.weight.grad.abs().sum() > 0 and b.head.weight.grad.abs().sum() > 0


def test_rule_groups_config_key_builds_a_grouped_rule_and_survives_toml():
    groups = '[{"pattern": "0.*", "rule": "lstm"}, {"pattern": "*", "rule": "adam", "config": {"lr": 0.01}}]'
    cfg = tiny_config("rule.layers=6", f"rule.groups={groups}")
    assert tomllib.loads(to_toml(cfg))["rule"]["groups"] == groups
    rule = build_rule(cfg["rule"])
    assert isinstance(rule, GroupedRule)
    assert rule.rules[0].config.layers == (6,)  # the [rule] section's LSTM keys
    assert rule.rules[1].hparams["lr"] == 0.01
    trainer = MetaTrainer(cfg, None, task=mlp_task(), progress=False)
    assert isinstance(trainer.rule, GroupedRule)
    with pytest.raises(L2OError, match="rule.groups"):
        build_rule({**cfg["rule"], "groups": "[{not json"})


def test_init_from_copies_a_saved_rule_into_every_group_and_resumes(tmp_path):
    """train.init_from: each group starts as the saved rule (architecture and weights, not the
    [rule] keys), the groups then train apart, and a resumed run rebuilds the same rule."""
    src = CoordinatewiseLSTM(LSTMRuleConfig(layers=(5,)))
    with torch.no_grad():
        for p in src.parameters():
            p.add_(0.01 * torch.randn_like(p))  # not the default init
    l2o.save(src, tmp_path / "src")
    groups = '[{"pattern": "0.*", "label": "first", "rule": "lstm"}, {"pattern": "*", "label": "rest", "rule": "lstm"}]'
    sets = [f"rule.groups={groups}", f"train.init_from={tmp_path / 'src'}", "rule.layers=7"]
    cfg = tiny_config(*sets)
    trainer = MetaTrainer(cfg, None, task=mlp_task(), progress=False)
    rule = trainer.rule
    assert isinstance(rule, GroupedRule) and rule.label_names == ["first", "rest"]
    for label in rule.label_names:
        sub = rule.groups[label]
        assert sub.config.layers == (5,)  # the saved rule's architecture, not rule.layers=7
        assert sub.training and all(p.requires_grad for p in sub.parameters())
        for k, v in src.state_dict().items():
            assert torch.equal(sub.state_dict()[k], v)
    assert rule.groups["first"].cells[0].weight_ih.data_ptr() != (
        rule.groups["rest"].cells[0].weight_ih.data_ptr()
    )  # copies, not one shared module
    out = tmp_path / "run"
    summary = MetaTrainer(cfg, out, task=mlp_task(), progress=False).train()
    trained = l2o.load(out / "final")
    # the start is validated before the first step: row 0, and the kept best is never worse
    import csv

    from l2o.plots import plot_validation

    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert rows[0]["meta_step"] == "0" and rows[0]["meta_loss"] == ""
    start = float(rows[0]["val_sum_loss"])
    assert summary["best_val_sum_loss"] <= start
    assert [r["meta_step"] for r in rows] == ["0", "1", "2"]
    plot_validation(out / "metrics.csv", tmp_path / "v.png")
    assert not torch.equal(trained.groups["first"].cells[0].weight_ih, src.cells[0].weight_ih)
    # resume: the rule is rebuilt from init_from, then last.ckpt's weights replace it
    cfg3 = tiny_config(*sets, "train.meta_steps=3")
    resumed = MetaTrainer(cfg3, out, task=mlp_task(), progress=False)
    resumed.train(resume=True)
    assert resumed.meta_step == 3
    # without groups the saved rule is the rule
    plain = MetaTrainer(tiny_config(f"train.init_from={tmp_path / 'src'}"), None, progress=False)
    assert plain.rule.config.layers == (5,)


def test_init_from_errors_name_the_key(tmp_path):
    with pytest.raises(L2OError, match="train.init_from: .*no trained optimizer"):
        MetaTrainer(tiny_config(f"train.init_from={tmp_path / 'nope'}"), None, progress=False)
    g = GroupedRule({"a": CoordinatewiseLSTM(LSTMRuleConfig(layers=(3,)))}, labels=[("*", "a")])
    l2o.save(g, tmp_path / "grouped")
    groups = '[{"pattern": "0.*", "label": "first", "rule": "lstm"}, {"pattern": "*", "label": "rest", "rule": "lstm"}]'
    cfg = tiny_config(f"rule.groups={groups}", f"train.init_from={tmp_path / 'grouped'}")
    with pytest.raises(L2OError, match=r"labels \['a'\]; rule.groups has \['first', 'rest'\]"):
        MetaTrainer(cfg, None, task=mlp_task(), progress=False)
