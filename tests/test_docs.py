"""Every code block of README.md and docs/*.md runs as written.

The rules:

* Blocks fenced as ```python or ```bash are run; other fences (console, text, json, yaml) show
  output, schemas or configuration and are not.
* A page's ```python blocks run in order in ONE namespace (later blocks use what earlier ones
  defined), in a fresh Python process whose working directory is a fresh temporary directory,
  so nothing is written into the checkout.
* Then the page's ```bash blocks that invoke `normkit` run in order, each with `bash -e -o
  pipefail`, in the same directory (so they may read the files the page's Python wrote);
  `normkit` there is this checkout's CLI.  Bash blocks that do not call normkit (pip,
  prometheus, promtool, ruff) are not run.
* A block right after a `<!-- not run: REASON -->` line is not run; the reason is required
  (it installs, needs a network, a GPU, a server that runs until stopped, ...).
* Every block that runs must succeed.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = Path(__import__("normkit").__file__).resolve().parents[1]  # the normkit under test
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)[ \t]*$")
NOT_RUN = re.compile(r"^\s*<!--\s*not run:(?P<reason>.*?)-->\s*$")
# `normkit` as a command word: at the start of a line or after a shell operator, outside a
# comment — not `import normkit` inside a heredoc, nor "normkit[monitor]" in a pip line.
CALLS_NORMKIT = re.compile(r"(?:^|[;&|(]|&&|\|\|)\s*normkit(?=\s|$)", re.MULTILINE)


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # 1-based line of the block's first code line
    lang: str
    code: str
    not_run: str | None  # the reason given, None when the block runs


def blocks(page: Path) -> list[Block]:
    """The fenced code blocks of a markdown page, in order."""
    lines = page.read_text(encoding="utf-8").splitlines()
    out, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m or not m["lang"]:
            i += 1
            continue
        prev = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        mark = NOT_RUN.match(prev)
        indent, start = len(m["indent"]), i + 1
        i = start
        while i < len(lines) and lines[i].strip() != "```":
            i += 1
        code = "\n".join(line[indent:] for line in lines[start:i]) + "\n"
        out.append(Block(page, start + 1, m["lang"], code,
                         None if mark is None else mark["reason"].strip()))
        i += 1
    return out


def _runs(block: Block) -> bool:
    if block.not_run is not None:
        return False
    return block.lang == "python" or (block.lang == "bash"
                                      and CALLS_NORMKIT.search(_uncommented(block.code)))


def _uncommented(code: str) -> str:
    return "\n".join(line for line in code.splitlines() if not line.lstrip().startswith("#"))


# Runs the blocks (read as JSON from stdin) in one fresh __main__ module; each is compiled with
# the page as its file name and padded to its line there, so a traceback (and inspect.getsource)
# points into the page.
_RUNNER = r"""
import json, sys, traceback, types
blocks = json.load(sys.stdin)
main = types.ModuleType("__main__")
sys.modules["__main__"] = main
for page, line, code in blocks:
    try:
        exec(compile("\n" * (line - 1) + code, page, "exec"), main.__dict__)
    except BaseException:
        traceback.print_exc()
        sys.exit(f"the python block at {page}:{line} failed")
"""


def _env(tmp_path: Path) -> dict[str, str]:
    """PYTHONPATH on the normkit under test, a `normkit` command that runs it, and one torch
    thread: the examples' tensors are small, and on a busy 2-core machine waking a second
    OpenMP thread costs more than their steps (normkit's bits do not depend on the count)."""
    shim = tmp_path / ".bin"
    shim.mkdir()
    exe = shim / "normkit"
    exe.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m normkit._cli.main "$@"\n')
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    path = os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return dict(os.environ, PYTHONPATH=path, PATH=f"{shim}{os.pathsep}{os.environ['PATH']}",
                MPLBACKEND="Agg", OMP_NUM_THREADS="1")


def _where(block: Block) -> str:
    return f"{block.page.relative_to(ROOT)}:{block.line}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_page_code_runs(page, tmp_path):
    run = [b for b in blocks(page) if _runs(b)]
    if not run:
        pytest.skip(f"{page.name} has no block to run")
    work = tmp_path / "work"
    work.mkdir()
    env = _env(tmp_path)
    # the page's absolute path, so that inspect.getsource finds the functions the blocks define
    python = [[str(b.page), b.line, b.code] for b in run if b.lang == "python"]
    if python:
        p = subprocess.run([sys.executable, "-c", _RUNNER], input=json.dumps(python), cwd=work,
                           env=env, capture_output=True, text=True, timeout=240)
        assert p.returncode == 0, p.stdout + p.stderr
    for b in run:
        if b.lang == "bash":
            p = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", b.code], cwd=work,
                               env=env, capture_output=True, text=True, timeout=240)
            assert p.returncode == 0, f"{_where(b)}:\n{b.code}\n{p.stdout}{p.stderr}"


def test_telemetry_page_lists_every_exported_metric():
    """docs/telemetry.md's metric table is the exporter's: every metric of
    ``normkit.monitor.METRICS`` under its exported name, with its labels, and no other."""
    from normkit.monitor.exporters import METRICS

    text = (ROOT / "docs" / "telemetry.md").read_text(encoding="utf-8")
    table = {m["name"]: m["labels"] for m in re.finditer(
        r"^\| `(?P<name>normkit_\w+)`[^|]*\| \w+ \| (?P<labels>[^|]*) \|", text, re.MULTILINE)}
    want = {}
    for name, kind, labels, _ in METRICS:
        extra = [x for x in labels if x not in ("model", "version", "rank")]
        want[name + "_total" if kind == "counter" else name] = extra
    assert set(table) == set(want)
    for name, labels in want.items():
        assert re.findall(r"[a-z_]+(?![^(]*\))", table[name]) == labels or (
            not labels and table[name].strip() == "–"), name


def test_blocks_not_run_say_why():
    marks = 0
    for page in PAGES:
        lines = page.read_text(encoding="utf-8").splitlines()
        starts = {b.line - 1 for b in blocks(page)}  # 1-based fence lines
        for n, line in enumerate(lines, 1):
            if "<!--" in line and "not run" in line:
                m = NOT_RUN.match(line)
                assert m and m["reason"].strip(), \
                    f"{page.name}:{n}: write it as <!-- not run: REASON --> with a reason"
                following = next((k for k in range(n + 1, len(lines) + 1)
                                  if lines[k - 1].strip()), None)
                assert following in starts, f"{page.name}:{n}: no code block follows"
                marks += 1
    assert marks >= 1  # at least the README's quick start, which installs


def test_the_parser_finds_the_blocks(tmp_path):
    """A guard for the test itself: the README's quick start is found, marked and not run; its
    python blocks are found and run; an indented block (in a list) is dedented."""
    readme = blocks(ROOT / "README.md")
    quick = next(b for b in readme if "pip install" in b.code and "normkit demo" in b.code)
    assert quick.lang == "bash" and quick.not_run and not _runs(quick)
    assert sum(b.lang == "python" and _runs(b) for b in readme) >= 2
    assert CALLS_NORMKIT.search("x=1 && normkit report run.jsonl")
    assert not CALLS_NORMKIT.search('pip install "normkit[monitor]"\npython -c "import normkit"')
    page = tmp_path / "page.md"
    page.write_text("- item\n\n  ```python\n  x = 1\n  ```\n")
    (b,) = blocks(page)
    assert (b.lang, b.code, b.line) == ("python", "x = 1\n", 4)
