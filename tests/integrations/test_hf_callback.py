"""NormkitCallback in a real Hugging Face ``Trainer``: a tiny Llama built from a config, trained
for a few optimizer steps on CPU with gradient accumulation; the watch counts exactly the
optimizer steps, the Trainer's logs (and so its reporters) carry the summary and the audit
verdict, and ``convert=True`` trains with normkit's norms."""

from __future__ import annotations

import json

import pytest
import torch

from normkit import nn as nk
from normkit.monitor import JsonlExporter, read_jsonl

T = pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate")
from normkit.integrations.hf import NormkitCallback  # noqa: E402

SEQ, BATCH, ACCUM, STEPS = 8, 2, 2, 3


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 64, (n, SEQ), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class Recorder(T.TrainerCallback):
    """Stands for a reporter (TensorBoard, MLflow, ...): what each on_log hands it."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


class Artifacts:
    """An exporter that takes artifacts, as MlflowExporter does."""

    def __init__(self):
        self.paths = []

    def export(self, record):
        pass

    def log_artifact(self, path):
        self.paths.append(path)

    def close(self):
        pass


class Refuses(Artifacts):
    def log_artifact(self, path):
        raise OSError("the artifact store is down")


def _trainer(tmp_path, callbacks):
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(T.LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=64, max_position_embeddings=64))
    args = T.TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=ACCUM, max_steps=STEPS, logging_steps=1, learning_rate=1e-3,
        report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0)
    return T.Trainer(model=model, args=args, train_dataset=Tokens(BATCH * ACCUM * STEPS),
                     callbacks=callbacks)


def test_the_callback_watches_optimizer_steps_and_logs_summary_and_verdict(tmp_path):
    reporter, arts = Recorder(), Artifacts()
    trainer = _trainer(tmp_path, [reporter])
    cb = NormkitCallback(exporters=[JsonlExporter(tmp_path / "run.jsonl"), Refuses(), arts],
                         convert=True, audit={"checks": ["inventory", "parameters", "epsilon"]})
    assert cb.install(trainer) is cb
    trainer.train()

    w = cb.watch
    assert trainer.state.global_step == STEPS
    assert w.steps == STEPS  # optimizer steps, not the ACCUM x STEPS forward calls
    recs = [r for r in read_jsonl(tmp_path / "run.jsonl") if r["type"] == "step"]
    assert [r["step"] for r in recs] == list(range(1, STEPS + 1))
    for r in recs:  # each record holds every micro-batch of its optimizer step
        assert {s["rows"] for s in r["layers"].values()} == {ACCUM * BATCH * SEQ}
    norms = [m for n, m in trainer.model.named_modules() if n.endswith("norm")]
    assert len(norms) == len(w.layer_names) == 5
    assert all(isinstance(m, nk.RMSNorm) for m in norms)  # convert=True

    losses = [e for e in trainer.state.log_history if "loss" in e]
    assert [e["normkit/steps"] for e in losses] == [1.0, 2.0, 3.0]
    layer = w.layer_names[0]
    assert losses[-1][f"normkit/{layer}/input_rms"] == pytest.approx(
        w.summary()[layer]["input_rms"])
    final = trainer.state.log_history[-1]
    assert "train_runtime" in final
    assert final["normkit/audit_ok"] == float(cb.audit_report.ok())
    assert final["normkit/audit_errors"] == cb.audit_report.counts()["error"]
    saved = tmp_path / "out" / "normkit-audit.json"
    assert json.loads(saved.read_text())["findings"] is not None
    assert arts.paths == [saved]
    # the reporter after it received the same keys
    assert [e.get("normkit/steps") for e in reporter.logs if "loss" in e] == [1.0, 2.0, 3.0]
    assert "normkit/audit_ok" in reporter.logs[-1]
    assert w.off == {} and not w._running
    trainer.log({"eval_loss": 1.0})  # after training (an evaluate()): not the watch's log
    assert not any(k.startswith("normkit/") for k in trainer.state.log_history[-1])


def test_bad_arguments_are_named():
    with pytest.raises(TypeError, match="audit must be True, False or a dict"):
        NormkitCallback(audit="yes")
    with pytest.raises(ValueError, match=r"watch_kwargs must not set \['step'\]"):
        NormkitCallback(watch_kwargs={"step": "forward"})
