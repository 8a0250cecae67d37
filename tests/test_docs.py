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
