"""Docs that quote the code must match it: the error catalogue is regenerated and compared."""

import importlib.util
import pathlib

import torch

from safeloss import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load_generator():
    spec = importlib.util.spec_from_file_location("gen_errors", ROOT / "docs" / "gen_errors.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_error_catalogue_is_current():
    if not torch.__version__.startswith("2.13."):
        import pytest

        pytest.skip("the catalogue quotes stock torch 2.13's messages")
    fresh = _load_generator().generate()
    committed = (ROOT / "docs" / "errors.md").read_text()
    assert committed == fresh, "docs/errors.md is stale: run `python docs/gen_errors.py`"


def test_demo_runs_every_case(capsys):
    assert cli.main(["demo", "--no-color"]) == 0
    out = capsys.readouterr().out
    from safeloss import demo

    for case in demo.CASES:
        assert f"({case.name})" in out
    assert "BatchSizeMismatchError" in out and "device-side assert" in out


def test_demo_all_runs_the_full_catalogue(capsys):
    from safeloss import demo

    assert cli.main(["demo", "--all", "--no-color"]) == 0
    out = capsys.readouterr().out
    for case in demo.CASES + demo.MORE_CASES:
        assert f"({case.name})" in out


def test_demo_filter_and_unknown_case(capsys):
    assert cli.main(["demo", "--only", "one-based"]) == 0
    assert "Labels that start at 1" in capsys.readouterr().out
    assert cli.main(["demo", "--only", "nope"]) == 2


def test_readme_counts_of_demo_cases_are_current():
    from safeloss import demo

    readme = (ROOT / "README.md").read_text()
    tour, every = len(demo.CASES), len(demo.CASES + demo.MORE_CASES + demo.LINEAR_CASES)
    assert f"a tour of {tour} classic mistakes" in readme and f"shows {tour} cases" in readme
    assert f"runs all {every} cases" in readme and f"(from all {every})" in readme


def test_readme_table_quotes_messages_the_code_prints():
    """The "What it catches" table quotes stock torch's messages (column 2) and safeloss's
    (column 3, `...excerpt...`): each must appear in the generated catalogue."""
    import re

    readme = (ROOT / "README.md").read_text()
    table = readme.split("## What it catches", 1)[1].split("\n\n", 2)[1]
    catalogue = (ROOT / "docs" / "errors.md").read_text()
    quoted = []
    for row in table.splitlines()[2:]:
        cells = row.split("|")[1:-1]
        quoted += [q for q in re.findall(r"`([^`]+)`", cells[1]) if " " in q]
        quoted += [q.strip(".") for q in re.findall(r"`(\.\.\.[^`]+\.\.\.)`", cells[2])]
    assert len(quoted) >= 8
    missing = [q for q in quoted if q not in catalogue]
    assert not missing, missing
