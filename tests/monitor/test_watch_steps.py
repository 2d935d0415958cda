"""What a watch counts as a step: a root forward call (``step="forward"``, the default), the
caller's ``w.step()`` (``"manual"``) or an optimizer step (``"optimizer"``); sampling counts those
steps and every exporter receives the same step number."""

from __future__ import annotations

import logging

import pytest
import torch

from normkit.monitor import JsonlExporter, PrometheusExporter, read_jsonl, watch

BATCH = 4


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16),
                               torch.nn.Linear(16, 4))


def _micro(model):
    model(torch.randn(BATCH, 8)).square().mean().backward()


def _steps(path):
    return [r for r in read_jsonl(path) if r["type"] == "step"]


def test_gradient_accumulation_four_forwards_one_optimizer_step_is_one_step(tmp_path):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    grad_norms = []
    with watch(model, model_name="m", model_version="v", step="optimizer", optimizer=opt,
               exporters=[JsonlExporter(tmp_path / "run.jsonl")]) as w:
        for _ in range(3):
            for _ in range(4):
                _micro(model)
            grad_norms.append(float(model[1].weight.grad.norm()))  # accumulated over 4
            opt.step()
            opt.zero_grad()
    recs = _steps(tmp_path / "run.jsonl")
    assert [r["step"] for r in recs] == [1, 2, 3]
    for r, g in zip(recs, grad_norms, strict=True):
        assert r["layers"]["1"]["rows"] == 4 * BATCH  # every micro-batch of the step
        assert r["summary"]["1"]["weight_grad_norm"] == pytest.approx(g, rel=1e-6)
    assert w.summary()["1"]["steps"] == 3
    assert w.summary()["1"]["rows"] == 3 * 4 * BATCH


def test_manual_steps_any_number_of_forwards(tmp_path):
    model = _model()
    with watch(model, model_name="m", model_version="v", step="manual",
               exporters=[JsonlExporter(tmp_path / "run.jsonl")]) as w:
        for n in (1, 3, 2):
            for _ in range(n):
                _micro(model)
            w.step()
    recs = _steps(tmp_path / "run.jsonl")
    assert [(r["step"], r["layers"]["1"]["rows"]) for r in recs] == \
        [(1, BATCH), (2, 3 * BATCH), (3, 2 * BATCH)]


def test_a_step_without_a_forward_is_counted_but_has_no_record(tmp_path):
    model = _model()
    with watch(model, model_name="m", model_version="v", step="manual",
               exporters=[JsonlExporter(tmp_path / "run.jsonl")]) as w:
        _micro(model)
        w.step()
        w.step()  # nothing ran: step 2 is empty
        _micro(model)
        w.step()
    assert [r["step"] for r in _steps(tmp_path / "run.jsonl")] == [1, 3]
    assert w.steps == 3


def test_every_counts_optimizer_steps_and_exporters_agree(tmp_path):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    prom = PrometheusExporter(port=None)
    with watch(model, model_name="m", model_version="v", step="optimizer", every=2,
               exporters=[prom, JsonlExporter(tmp_path / "run.jsonl")]) as w:
        w.attach_optimizer(opt)
        for _ in range(5):
            for _ in range(3):
                _micro(model)
            opt.step()
            opt.zero_grad()
        w.flush()
        labels = {"model": "m", "version": "v", "rank": "0"}
        seen = prom.registry.get_sample_value("normkit_steps_total", labels)
        sampled = prom.registry.get_sample_value("normkit_sampled_steps_total", labels)
    assert [r["step"] for r in _steps(tmp_path / "run.jsonl")] == [1, 3, 5]
    assert (seen, sampled, w.steps) == (5, 3, 5)


def test_forward_steps_are_unchanged(tmp_path):
    model = _model()
    with watch(model, model_name="m", model_version="v",
               exporters=[JsonlExporter(tmp_path / "run.jsonl")]):
        for _ in range(3):
            _micro(model)
    assert [r["step"] for r in _steps(tmp_path / "run.jsonl")] == [1, 2, 3]


def test_optimizer_steps_without_an_optimizer_say_so(caplog):
    model = _model()
    with caplog.at_level(logging.WARNING, "normkit.monitor.watch"):
        w = watch(model, model_name="m", model_version="v", step="optimizer")
        _micro(model)
        _micro(model)
    assert "steps" in w.off and "attach_optimizer" in w.off["steps"]
    assert sum("attach_optimizer" in r.getMessage() for r in caplog.records) == 1
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    w.attach_optimizer(opt)
    assert "steps" not in w.off
    opt.step()
    w.stop()
    assert w.summary()["1"]["steps"] == 1


def test_the_optimizer_hook_is_removed_at_stop(tmp_path):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with watch(model, model_name="m", model_version="v", step="optimizer", optimizer=opt):
        pass
    assert not opt._optimizer_step_post_hooks


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"step": "epoch"}, ValueError, r"step must be 'forward', 'manual' or 'optimizer'"),
    ({"step": 1}, ValueError, r"step must be"),
    ({"optimizer": "sgd", "step": "optimizer"}, TypeError, r"optimizer must be a torch.optim"),
    ({"optimizer": None, "step": "manual", "_opt": True}, ValueError,
     r"optimizer= is for step='optimizer'"),
])
def test_bad_step_arguments(kwargs, exc, match):
    model = _model()
    if kwargs.pop("_opt", False):
        kwargs["optimizer"] = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(exc, match=match):
        watch(model, model_name="m", model_version="v", **kwargs)


def test_step_and_attach_misuse_are_clear_errors():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with watch(model, model_name="m", model_version="v") as w:
        with pytest.raises(RuntimeError, match=r"w.step\(\) is for step='manual'"):
            w.step()
        with pytest.raises(ValueError, match=r"attach_optimizer is for step='optimizer'"):
            w.attach_optimizer(opt)
    with watch(model, model_name="m", model_version="v", step="optimizer", optimizer=opt) as w:
        w.attach_optimizer(opt)  # the same one again: nothing changes
        other = torch.optim.SGD(model.parameters(), lr=0.1)
        with pytest.raises(ValueError, match=r"one optimizer"):
            w.attach_optimizer(other)
    w = watch(model, model_name="m", model_version="v", step="manual")
    w.stop()
    with pytest.raises(RuntimeError, match=r"stopped"):
        w.step()


def test_every_backward_of_an_accumulated_step_is_checked(tmp_path):
    """A parameter gradient that goes non-finite in the second micro-batch's backward, where no
    norm layer sees it (the head's weight gradient), is still found for that step."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with watch(model, model_name="m", model_version="v", step="optimizer", optimizer=opt,
               exporters=[JsonlExporter(tmp_path / "run.jsonl")]):
        _micro(model)
        h = model[2].weight.register_hook(lambda g: g * float("nan"))
        _micro(model)
        h.remove()
        opt.step()
    (rec,) = _steps(tmp_path / "run.jsonl")
    assert rec["nonfinite"]["backward"]["origin"] == "2"
