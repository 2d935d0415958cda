"""The README's quick start stays true: .ci/run runs the README's test command verbatim."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _quick_start_commands():
    text = (ROOT / "README.md").read_text()
    block = text.split("## Quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [line.strip() for line in block.strip().splitlines() if line.strip()]


def test_quick_start_is_two_commands():
    cmds = _quick_start_commands()
    assert len(cmds) == 2
    assert "normkit " in cmds[0] and "pytest" in cmds[1]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert _quick_start_commands()[1] in [line.strip() for line in ci]


def test_ci_checks_the_wheel_on_its_own():
    """.ci/run also runs .ci/check-wheel: a wheel built from the checkout installs in a fresh
    environment without a compiler and passes the kernel tests there."""
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert ".ci/check-wheel" in ci
    script = (ROOT / ".ci" / "check-wheel").read_text()
    assert "python\" -m build --wheel --no-isolation" in script and "-m venv" in script
