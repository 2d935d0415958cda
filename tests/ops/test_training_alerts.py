"""The in-process training-health rules (``AlertRules.check_training``): gradient-norm spikes,
vanishing gradients, γ/β frozen and exploding — on a real watched training run where the data
path matters, on hand-made numbers where the thresholds do."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from _monitor_models import TinyTransformer, lm_batch, train_step

from normkit.monitor import AlertRules, TrainingLimits, watch
from normkit.monitor.alerts import RUNBOOK_BASE

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _stats(grad=None, w=None, w_upd=None, w_grad=None, b=None, b_upd=None, b_grad=None):
    return SimpleNamespace(grad_input_norm=grad, weight_norm=w, weight_update_norm=w_upd,
                           weight_grad_norm=w_grad, bias_norm=b, bias_update_norm=b_upd,
                           bias_grad_norm=b_grad)


def _run(rules: AlertRules, steps: list[dict]) -> list[tuple[int, str, str]]:
    """(step index, rule, layer) of every alert opened over ``steps`` ({layer: stats})."""
    out = []
    for i, layers in enumerate(steps):
        out += [(i, a.rule, a.layer) for a in rules.check_training("lm", "v1", layers)]
    return out


def _rules(**limits) -> AlertRules:
    return AlertRules(log_alerts=False, training=TrainingLimits(**limits))


def test_healthy_training_opens_no_training_alert():
    """10 seeds of a normally trained TinyTransformer: not one training alert."""
    for seed in range(10):
        torch.manual_seed(seed)
        m = TinyTransformer()
        opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
        rules = AlertRules(log_alerts=False)
        with watch(m, model_name="lm", model_version=str(seed), alerts=rules,
                   background_export=False):
            for _ in range(12):
                train_step(m, opt, *lm_batch())
        assert rules.alerts == [], (seed, [a.message for a in rules.alerts])


def test_frozen_norm_parameters_are_a_ticket_with_their_runbook():
    """The optimizer is built without one layer's γ/β (a classic param-group bug): they get
    gradients but never change -> an affine_frozen ticket naming that layer, after ``history``
    sampled steps and not before."""
    torch.manual_seed(0)
    m = TinyTransformer()
    frozen = {id(p) for p in m.blocks[2].ln1.parameters()}
    opt = torch.optim.SGD([p for p in m.parameters() if id(p) not in frozen], lr=0.05)
    rules = _rules(sustain=2, history=3)
    with watch(m, model_name="lm", model_version="v1", alerts=rules, background_export=False) as w:
        for i in range(6):
            train_step(m, opt, *lm_batch())
            w.flush()
            # step 1 has no update to compare with, so the third streak step is step 4
            assert bool(rules.alerts) == (i >= 3), (i, rules.alerts)
    (a,) = rules.alerts
    assert (a.rule, a.severity, a.layer) == ("affine_frozen", "ticket", "blocks.2.ln1")
    assert a.runbook_url == RUNBOOK_BASE + "params-frozen.md"
    assert a.to_dict()["runbook_url"] == a.runbook_url


def test_exploding_gamma_is_a_page():
    """γ of one layer doubled every step (as a diverging optimizer would): a page after
    ``sustain`` steps over 10x its recent minimum."""
    torch.manual_seed(0)
    m = TinyTransformer()
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    rules = AlertRules(log_alerts=False)
    with watch(m, model_name="lm", model_version="v1", alerts=rules, background_export=False):
        for _ in range(12):
            train_step(m, opt, *lm_batch())
            with torch.no_grad():
                m.ln_f.weight.mul_(2.0)
    pages = [a for a in rules.alerts if a.severity == "page"]
    assert [(a.rule, a.layer) for a in pages] == [("affine_exploding", "ln_f")]
    assert "‖γ‖" in pages[0].message


def test_gradient_spike_against_the_layers_own_history():
    rules = _rules(sustain=2)
    steady = [{"a": _stats(grad=1.0 + 0.1 * (i % 3)), "b": _stats(grad=2.0)} for i in range(6)]
    spike = [{"a": _stats(grad=30.0), "b": _stats(grad=2.0)}] * 2
    # b at 2.0 is far above a's history but not its own: only a spikes.
    assert _run(rules, steady + spike) == [(7, "grad_spike", "a")]


def test_gradient_accumulation_is_not_frozen():
    """An optimizer step on one sampled step in 4: three zero updates in a row are no alert,
    however small ``sustain`` is; ``history`` zero updates in a row are."""
    rules = _rules(sustain=1, history=6)
    steps = [{"a": _stats(w=4.0, w_grad=0.3, w_upd=0.01 if i % 4 == 0 else 0.0)}
             for i in range(12)]
    assert _run(rules, steps) == []
    frozen = [{"a": _stats(w=4.0, w_grad=0.3, w_upd=0.0)}] * 6
    assert _run(_rules(sustain=1, history=6), frozen) == [(5, "affine_frozen", "a")]


def test_one_step_spike_is_noise():
    rules = _rules(sustain=2)
    steps = [{"a": _stats(grad=1.0)}] * 5 + [{"a": _stats(grad=30.0)}] + [{"a": _stats(grad=1.0)}]
    assert _run(rules, steps) == []


def test_vanishing_gradient_relative_to_the_largest_layer():
    rules = _rules(sustain=3)
    steps = [{"deep": _stats(grad=5e-4), "mid": _stats(grad=0.01), "top": _stats(grad=1.0)}] * 3
    assert _run(rules, steps) == [(2, "grad_vanishing", "deep")]
    assert rules.alerts[0].severity == "ticket"
    assert rules.alerts[0].runbook_url.endswith("/vanishing-gradients.md")


def test_non_finite_numbers_are_left_to_the_nonfinite_rule():
    rules = _rules(sustain=1)
    steps = [{"a": _stats(grad=1.0, w=4.0)}] * 3
    steps += [{"a": _stats(grad=float("nan"), w=float("inf"), w_upd=float("nan"), w_grad=1.0)}]
    steps += [{"a": _stats(grad=1.0, w=4.0)}]  # the history was not poisoned
    assert _run(rules, steps) == []


def test_beta_growing_from_zero_is_not_exploding():
    rules = _rules(sustain=1)
    assert _run(rules, [{"a": _stats(b=0.0)}, {"a": _stats(b=0.5)}, {"a": _stats(b=3.0)}]) == []
    assert _run(rules, [{"a": _stats(b=12.0)}]) == [(0, "affine_exploding", "a")]


def test_runbook_base_can_be_set_once(monkeypatch):
    monkeypatch.setenv("NORMKIT_RUNBOOK_BASE", "https://wiki.example.com/normkit/runbooks")
    a = AlertRules(log_alerts=False).fire("drift", "lm", "v1", "ln", "x")
    assert a.runbook_url == "https://wiki.example.com/normkit/runbooks/drift.md"


@pytest.mark.parametrize("kw, match", [
    ({"spike_factor": 1.0}, "spike_factor must be > 1"),
    ({"vanish_ratio": 0}, r"vanish_ratio must be in \(0, 1\)"),
    ({"sustain": 0}, "sustain must be an int >= 1"),
    ({"sustain": 9, "history": 4}, r"sustain \(9\) must be <= history \(4\)"),
])
def test_bad_limits_are_clear_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        TrainingLimits(**kw)
