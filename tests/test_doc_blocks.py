"""Docs that run: every Python block in README.md, docs/*.md and benchmarks/README.md executes as
written, in a fresh namespace, except fragments, which say so on their first line
(``# fragment: <what the block needs from around it>``) and must still parse. The demo fits the
terminal it prints to."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import safeloss

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)
FRAGMENT = "# fragment"
# Pages whose blocks another test already runs (and checks the output of): parsed here only.
RUN_ELSEWHERE = {"docs/myths.md": "tests/test_examples.py::test_myths_page_shows_real_outputs"}


def _blocks() -> list[tuple[str, int, str]]:
    out = []
    for page in PAGES:
        text = page.read_text()
        for m in FENCE.finditer(text):
            if m.group(1) in ("python", "py"):
                out.append((page.relative_to(ROOT).as_posix(), text[: m.start()].count("\n") + 1, m.group(2)))
    return out


BLOCKS = _blocks()


def test_the_pages_have_blocks_and_a_fragment_says_what_it_needs():
    assert len(BLOCKS) >= 10
    for page, line, code in BLOCKS:
        first = code.lstrip().splitlines()[0] if code.strip() else ""
        if first.startswith(FRAGMENT):
            assert re.match(r"# fragment: \S", first), f"{page}:{line}: say what the fragment needs"


@pytest.mark.usefixtures("clean_patch")
@pytest.mark.parametrize("page, line, code", BLOCKS, ids=[f"{p}:{n}" for p, n, _ in BLOCKS])
def test_block_runs_as_written(page, line, code, capsys):
    compiled = compile(code, f"{page}:{line}", "exec")  # fragments too must parse
    if code.lstrip().startswith(FRAGMENT):
        pytest.skip("a fragment (marked on its first line)")
    if page in RUN_ELSEWHERE:
        pytest.skip(f"run by {RUN_ELSEWHERE[page]}")
    try:
        exec(compiled, {"__name__": "__doc_block__"})
    finally:  # blocks may set process-wide state on purpose (set_strict, patch)
        safeloss.set_strict(None)
        safeloss.unpatch()
        safeloss.reset_warnings()


@pytest.mark.parametrize("columns, extra", [(80, ["--all"]), (60, [])])
def test_demo_fits_the_terminal(columns, extra, monkeypatch, capsys):
    from safeloss import cli

    monkeypatch.setenv("COLUMNS", str(columns))  # what shutil.get_terminal_size reads first
    assert cli.main(["demo", "--no-color", *extra]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) > 100
    too_long = [line for line in lines if len(line) > columns]
    assert not too_long, too_long[:3]
