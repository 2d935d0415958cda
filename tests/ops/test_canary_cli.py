"""``normkit canary`` on the command line: the table, JSON and markdown say the decision the
exit code says; inputs it cannot use are one line and exit code 2; the rollout webhook
(deploy/canary/webhook.py) answers Flagger's way."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from _canary_demo import demo, write_jsonl
from _prometheus import free_port

from normkit._cli.canary import parse_time
from normkit._cli.main import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[2]
WEBHOOK = ROOT / "deploy" / "canary" / "webhook.py"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("canary")
    demo()[2].save(d / "baseline.json")
    return {"dir": d, "baseline": d / "baseline.json",
            "promote": write_jsonl(d / "healthy.jsonl", seed=100),
            "rollback": write_jsonl(d / "eps.jsonl", seed=101, fault="eps-1e-2"),
            "hold": write_jsonl(d / "short.jsonl", seed=102, steps=3)}


@pytest.mark.parametrize("decision,code", [("promote", 0), ("hold", 1), ("rollback", 1)])
def test_every_format_says_what_the_exit_code_says(files, capsys, decision, code):
    argv = ["canary", str(files[decision]), "--baseline", str(files["baseline"])]
    said = {}
    for fmt in ("table", "json", "markdown"):
        assert main([*argv, "--format", fmt]) == code
        said[fmt] = capsys.readouterr().out
    doc = json.loads(said["json"])
    assert doc["decision"] == decision and doc["exit_code"] == code
    assert f"**{decision}**" in said["markdown"].splitlines()[0]
    assert f": {decision.upper()} —" in said["table"].splitlines()[0]
    for other in {"promote", "hold", "rollback"} - {decision}:
        assert other.upper() not in said["table"].splitlines()[0]
    if decision == "hold":
        assert "not enough traffic yet" in said["json"]
    assert ("no rule crossed" in said["table"]) == (decision == "promote")


def test_output_file_json_or_markdown(files, capsys):
    out = files["dir"] / "verdict.md"
    argv = ["canary", str(files["rollback"]), "--baseline", str(files["baseline"])]
    assert main([*argv, "--format", "json", "--output", str(out)]) == 1
    assert out.read_text().startswith("## normkit canary: **rollback**")
    out = files["dir"] / "verdict.json"
    assert main([*argv, "--output", str(out)]) == 1
    assert json.loads(out.read_text())["decision"] == "rollback"
    capsys.readouterr()


def test_policy_file_changes_the_verdict_and_bad_ones_are_named(files, capsys):
    pol = files["dir"] / "strict.json"
    pol.write_text(json.dumps({"version": 1, "evidence": {"min_steps": 100}}))
    argv = ["canary", str(files["promote"]), "--baseline", str(files["baseline"])]
    assert main([*argv, "--policy", str(pol), "--format", "json"]) == 1
    assert json.loads(capsys.readouterr().out)["reasons"][0]["rule"] == "evidence.steps"
    pol.write_text(json.dumps({"version": 1, "evidence": {"min_step": 100}}))
    assert main([*argv, "--policy", str(pol)]) == 2
    err = capsys.readouterr().err
    assert "strict.json: evidence.min_step: unknown key" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("extra,message", [
    (["missing.jsonl"], "could not run: No such file or directory (missing.jsonl)"),
    ([], "give the candidate's CANDIDATE.jsonl, or --prometheus URL"),
    (["--prometheus", "http://127.0.0.1:1"], "--prometheus needs --since, --model, --version"),
    (["{healthy}", "--prometheus", "http://x", "--since", "1m", "--model", "m", "--version",
      "v"], "give either CANDIDATE.jsonl"),
    (["{healthy}", "--since", "1m"], "--since and --until need --prometheus"),
    (["--prometheus", "ftp://x", "--since", "1m", "--model", "m", "--version", "v"],
     "url must start with http"),
    (["{baseline}"], "could not run: "),  # a baseline is not a telemetry file
])
def test_inputs_it_cannot_use_are_one_line_and_exit_2(files, capsys, extra, message):
    extra = [a.format(healthy=files["promote"], baseline=files["baseline"]) for a in extra]
    assert main(["canary", *extra, "--baseline", str(files["baseline"])]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err


def test_bad_baseline_and_bad_time_exit_2(files, capsys, tmp_path):
    bad = tmp_path / "b.json"
    bad.write_text("{")
    assert main(["canary", str(files["promote"]), "--baseline", str(bad)]) == 2
    assert "b.json: not JSON" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["canary", "--baseline", str(bad), "--prometheus", "http://x", "--since", "soon"])
    assert e.value.code == 2
    assert "invalid time 'soon'" in capsys.readouterr().err


def test_parse_time():
    assert parse_time("15m", now=1000.0) == 100.0
    assert parse_time("1d", now=86400.0) == 0.0
    assert parse_time("1h30m", now=6000.0) == 600.0  # --silence-for's syntax, compound too
    assert parse_time("500ms", now=1.0) == 0.5
    assert parse_time("1234.5") == 1234.5
    assert parse_time("1970-01-01T00:01:00Z") == 60.0
    assert parse_time("1970-01-01T01:01:00+01:00") == 60.0


def _post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_webhook_answers_flagger_style(files):
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(WEBHOOK), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert "canary webhook on" in proc.stdout.readline()
        url = f"http://127.0.0.1:{port}/"
        base = str(files["baseline"])
        for decision, status in (("promote", 200), ("hold", 425), ("rollback", 412)):
            # Flagger's payload: name, namespace, phase and the webhook's metadata (strings)
            code, body = _post(url, {"name": "clf", "namespace": "ml", "phase": "Progressing",
                                     "metadata": {"candidate": str(files[decision]),
                                                  "baseline": base}})
            assert (code, body["decision"]) == (status, decision)
            assert body["exit_code"] == (0 if decision == "promote" else 1)
        code, body = _post(url, {"candidate": str(files["promote"])})
        assert code == 400 and body == {"error": "baseline: missing (a baseline JSON path)"}
        code, body = _post(url, {"metadata": {"candidate": "nope.jsonl", "baseline": base}})
        assert code == 400 and "No such file" in body["error"]
        code, body = _post(url, {"metadata": {"prometheus": "http://127.0.0.1:1",
                                              "baseline": base}})
        assert code == 400 and body["error"] == "prometheus needs since, model, version"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_help_lists_the_command():
    out = subprocess.run([sys.executable, "-m", "normkit._cli.main", "canary", "--help"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "exit codes: 0 promote" in out.stdout
    assert "canary" in subprocess.run([sys.executable, "-m", "normkit._cli.main", "--help"],
                                      capture_output=True, text=True, timeout=60).stdout
