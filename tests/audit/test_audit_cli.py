"""`normkit audit` through the installed entry point, in a subprocess: exit codes, JSON, and
every kind of TARGET (factory, checkpoint, safetensors, Hugging Face directory, ONNX)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import audit_models as A
import pytest
import torch

TESTS = Path(__file__).parent
# The package these tests import: the subprocess must run the same code (the entry point's own
# install may be another checkout's).
SRC = Path(importlib.util.find_spec("normkit").origin).resolve().parents[1]
FAST = "--checks=inventory,parameters,epsilon"


def normkit_env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), str(SRC)]))


def normkit(*args, cwd=TESTS, timeout=300):
    exe = shutil.which("normkit")
    if exe is None:
        pytest.skip("the normkit entry point is not installed (pip install -e .)")
    env = normkit_env()
    return subprocess.run([exe, "audit", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)


def test_audit_is_a_registered_command():
    from normkit._cli.main import build_parser

    args = build_parser().parse_args(["audit", "m:f", "--dtype", "float16", "--fail-on",
                                      "warning", "--checks", "epsilon,export"])
    assert (args.command, args.target, args.dtype, args.fail_on, args.checks) == (
        "audit", "m:f", "float16", "warning", ("epsilon", "export"))
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["audit", "m:f", "--checks", "eps"])
    assert e.value.code == 2


def test_factory_with_findings_exits_1_and_json_is_valid(tmp_path):
    out = tmp_path / "report.json"
    r = normkit("audit_models:nan_gamma", FAST, "--format", "json", "--output", out)
    assert r.returncode == 1, r.stderr
    doc = json.loads(r.stdout)
    assert doc == json.loads(out.read_text())
    assert doc["schema_version"] == 1 and doc["ok"] is False
    assert [(f["id"], f["layer"]) for f in doc["findings"]] == [("NK-PARAM-002", "blocks.1.ln2")]
    assert "Traceback" not in r.stderr


def test_input_shape_is_widened_to_a_batch_of_3():
    r = normkit("audit_models:keras_eps", FAST + ",batch", "--input-shape", "1,5",
                "--format", "json")
    assert r.returncode == 0, r.stderr  # a warning does not fail the default gate
    doc = json.loads(r.stdout)
    assert doc["counts"]["warning"] == 1
    assert doc["metrics"]["batch"]["batch"] == 3  # one sample of 5 tokens, widened to 3


def _printed_verdict(fmt: str, stdout: str) -> tuple[bool, str]:
    """(passed?, the gate it names) as the report printed in ``fmt`` says it."""
    if fmt == "json":
        doc = json.loads(stdout)
        return doc["ok"], doc["fail_on"]
    head = stdout.splitlines()[0]
    if fmt == "markdown":
        assert head.startswith("## normkit audit")
        assert ("✅ passed" in head) != ("❌ failed" in head), head
    else:
        assert (": passed" in head) != (": failed" in head), head
    return "passed" in head, head.split("--fail-on ", 1)[1].split()[0].strip(")`;,.")


# keras_eps has one warning (NK-EPS-003) and no error: the default gate passes it, a
# --fail-on warning gate fails it, and every format must say so.
@pytest.mark.parametrize("fail_on,code", [("error", 0), ("warning", 1)])
@pytest.mark.parametrize("fmt", ["table", "markdown", "json"])
def test_printed_verdict_is_the_verdict_of_the_exit_code(tmp_path, fmt, fail_on, code):
    out = tmp_path / ("report.md" if fmt == "markdown" else "report.json")
    r = normkit("audit_models:keras_eps", FAST, "--fail-on", fail_on, "--format", fmt,
                "--output", out)
    assert r.returncode == code, r.stdout + r.stderr
    assert "NK-EPS-003" in r.stdout
    assert _printed_verdict(fmt, r.stdout) == (code == 0, fail_on)
    # the --output file carries the same verdict
    written = "markdown" if fmt == "markdown" else "json"
    assert _printed_verdict(written, out.read_text()) == (code == 0, fail_on)


def _recipe_audit_commands() -> list[str]:
    """The `run:` commands of docs/audit.md's GitHub Actions recipe that call normkit audit."""
    text = (TESTS.parents[1] / "docs" / "audit.md").read_text()
    recipe = text.split("## GitHub Actions", 1)[1].split("```yaml", 1)[1].split("```", 1)[0]
    return re.findall(r"^\s*(?:- )?run: (normkit audit .*)$", recipe, re.MULTILINE)


@pytest.mark.parametrize("target,code,verdict", [
    ("audit_models:nan_gamma", 1, "❌ failed"),  # an error-level finding
    ("audit_models:pre_ln", 0, "✅ passed"),
])
def test_github_actions_recipe_shows_a_failed_gate_as_failed(tmp_path, target, code, verdict):
    """Each audit step of the documented workflow, run as GitHub runs it (`bash -e`, the job
    summary in $GITHUB_STEP_SUMMARY), on a model in place of the recipe's placeholder: the
    step's exit code and the verdict in the job summary agree."""
    exe = shutil.which("normkit")
    if exe is None:
        pytest.skip("the normkit entry point is not installed (pip install -e .)")
    commands = _recipe_audit_commands()
    assert len(commands) == 2, commands
    for command in commands:
        summary = tmp_path / "summary.md"
        summary.write_text("")
        command = re.sub(r"^normkit audit \S+", f"{exe} audit {target} {FAST}", command)
        r = subprocess.run(["bash", "-e", "-c", command], capture_output=True, text=True,
                           cwd=tmp_path, timeout=300,
                           env=dict(normkit_env(), GITHUB_STEP_SUMMARY=str(summary)))
        assert r.returncode == code, command + "\n" + r.stderr
        assert verdict in summary.read_text().splitlines()[0], command
    assert json.loads((tmp_path / "audit.json").read_text())["ok"] is (code == 0)


def test_healthy_factory_full_audit_table_exits_0():
    r = normkit("audit_models:pre_ln_with_inputs", "--skip", "quantization,checkpoint")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "passed (--fail-on error) — 0 error(s), 0 warning(s)" in r.stdout
    assert "blocks.0.ln1" in r.stdout
    assert "ONNX: dynamo exporter" in r.stdout


@pytest.mark.parametrize("target,message", [
    ("missing_file.pt", "no such file"),
    ("audit_models:no_such_factory", "no callable"),
])
def test_bad_targets_exit_2_with_one_line(target, message):
    r = normkit(target)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def _onnx_model(path: Path) -> Path:
    """A small healthy ONNX file (Linear + fused LayerNormalization) at ``path``."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8)).eval()
    torch.onnx.export(model, (torch.randn(2, 8),), str(path), dynamo=False, opset_version=17)
    return path


def _external(tmp_path: Path) -> Path:
    """An ONNX file whose tensors live in m.onnx.data next to it."""
    import onnx

    proto = onnx.load(str(_onnx_model(tmp_path / "inline.onnx")))
    onnx.save_model(proto, str(tmp_path / "m.onnx"), save_as_external_data=True,
                    location="m.onnx.data", size_threshold=0)
    return tmp_path / "m.onnx"


def _truncated(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


# (name, build the file in tmp_path, words the one-line reason must contain)
UNREADABLE = [
    ("empty.onnx", lambda d: _touch(d / "empty.onnx"), "empty (0 bytes)"),
    # printed as is: brackets are not terminal markup
    ("brackets", lambda d: _touch(d / "run[b][v1].onnx"), "empty (0 bytes)"),
    ("corrupt.onnx", lambda d: _truncated(_onnx_model(d / "corrupt.onnx")), "cannot read"),
    ("text.onnx", lambda d: _write(d / "text.onnx", b"not a model\n"), "cannot read"),
    ("no_graph.onnx", lambda d: _write(d / "no_graph.onnx", b"\x08\x07"), "no graph"),
    ("data_missing", lambda d: _unlink_data(_external(d)), "m.onnx.data"),
    ("data_truncated", lambda d: _truncate_data(_external(d)), "m.onnx.data"),
    ("unknown_op.onnx", lambda d: _unknown_op(d / "unknown_op.onnx"), "ONNX Runtime"),
    ("empty.pt", lambda d: _touch(d / "empty.pt"), "cannot read"),
    ("empty.safetensors", lambda d: _touch(d / "empty.safetensors"), "cannot read"),
]


def _touch(path: Path) -> Path:
    path.touch()
    return path


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _unlink_data(path: Path) -> Path:
    (path.parent / "m.onnx.data").unlink()
    return path


def _truncate_data(path: Path) -> Path:
    _truncated(path.parent / "m.onnx.data")
    return path


def _unknown_op(path: Path) -> Path:
    """A valid graph with an op no runtime here implements."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Frobnicate", ["x"], ["y"], domain="example.custom")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("example.custom", 1)])
    onnx.save(model, str(path))
    return path


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the legacy exporter, on purpose
@pytest.mark.parametrize("name,build,reason", UNREADABLE, ids=[u[0] for u in UNREADABLE])
def test_unreadable_targets_exit_2_with_one_line_naming_the_file(tmp_path, name, build, reason):
    pytest.importorskip("onnx")
    pytest.importorskip("safetensors")
    path = build(tmp_path)
    r = normkit(path, "--format", "json")
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stdout == ""  # no verdict, no report: the audit did not run
    (line,) = r.stderr.strip().splitlines()
    assert "Traceback" not in line and path.name in line and reason in line, line


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_onnx_without_norms_fails_the_gate(tmp_path):
    """A graph the audit can read but with nothing to audit is an error, not a pass."""
    pytest.importorskip("onnx")
    path = tmp_path / "mlp.onnx"
    torch.onnx.export(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU()).eval(),
                      (torch.randn(2, 8),), str(path), dynamo=False, opset_version=17)
    r = normkit(path, "--format", "json")
    assert r.returncode == 1, r.stdout + r.stderr
    doc = json.loads(r.stdout)
    assert doc["ok"] is False
    assert [(f["id"], f["severity"]) for f in doc["findings"]] == [("NK-INV-001", "error")]


def test_checkpoint_targets(tmp_path):
    from safetensors.torch import save_file

    model = A.pre_ln()
    sd = model.state_dict()
    del sd["blocks.1.ln1.weight"]
    torch.save(sd, tmp_path / "ckpt.pt")
    r = normkit(tmp_path / "ckpt.pt", "--model", "audit_models:pre_ln", FAST, "--format",
                "json")
    assert r.returncode == 1, r.stderr
    ids = {(f["id"], f["layer"]) for f in json.loads(r.stdout)["findings"]}
    assert ids == {("NK-PARAM-001", "blocks.1.ln1")}

    # bare safetensors: parameter checks on the keys only, a NaN γ found
    sd = A.nan_gamma().state_dict()
    save_file(sd, tmp_path / "w.safetensors")
    r = normkit(tmp_path / "w.safetensors", "--format", "json")
    assert r.returncode == 1, r.stderr
    doc = json.loads(r.stdout)
    assert {f["id"] for f in doc["findings"] if f["severity"] != "info"} == {"NK-PARAM-002"}
    # the norm-like names: blocks.*.ln1/ln2 ("final" does not say it is a norm)
    assert sorted(L["name"] for L in doc["layers"]) == [
        f"blocks.{i}.ln{j}" for i in (0, 1) for j in (1, 2)]

    # a pickled module is refused (weights_only=True), exit 2
    torch.save(model, tmp_path / "whole.pt")
    r = normkit(tmp_path / "whole.pt")
    assert r.returncode == 2 and "weights_only=True" in r.stderr
    assert "Traceback" not in r.stderr


def test_hf_directory_target(tmp_path):
    T = pytest.importorskip("transformers")
    cfg = T.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=48, max_position_embeddings=64)
    torch.manual_seed(0)
    T.BertModel(cfg).save_pretrained(tmp_path / "bert")
    r = normkit(tmp_path / "bert", FAST, "--dtype", "float16", "--format", "json")
    assert r.returncode == 1, r.stderr  # BERT's eps 1e-12 is 0 in float16
    doc = json.loads(r.stdout)
    assert {f["id"] for f in doc["findings"]} == {"NK-EPS-001"}
    assert doc["dtype"] == "float16"
    assert len(doc["layers"]) == 5 and doc["layers"][0]["name"] == "embeddings.LayerNorm"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the legacy exporter, on purpose
def test_onnx_file_target(tmp_path):
    pytest.importorskip("onnx")
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8, eps=0.0)).eval()
    path = tmp_path / "m[b].onnx"  # brackets: a literal name, not terminal markup
    torch.onnx.export(model, (torch.randn(2, 8),), str(path), dynamo=False, opset_version=17)
    r = normkit(path, "--format", "json")
    assert r.returncode == 1, r.stderr
    doc = json.loads(r.stdout)
    assert {f["id"] for f in doc["findings"]} == {"NK-EPS-001"}
    assert doc["layers"][0]["type"] == "LayerNormalization"
    r = normkit(path)
    assert r.returncode == 1 and f"{path}: failed (--fail-on error)" in r.stdout, r.stdout
