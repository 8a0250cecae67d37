"""The examples run, on CPU, and show what they claim to show."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_script(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=120)


# ------------------------------------------------------------------------------ train_digits


@pytest.fixture(scope="module")
def digits() -> ModuleType:
    pytest.importorskip("sklearn")
    return _load("train_digits")


def test_digits_trains(digits: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    assert digits.main(["--epochs", "4"]) == 0
    out = capsys.readouterr().out
    accuracy = [float(a) for a in re.findall(r"test accuracy ([\d.]+)%", out)]
    assert len(accuracy) == 4
    assert accuracy[-1] > 85.0, out


@pytest.mark.parametrize(
    ("bug", "error", "fix"),
    [
        ("softmax", "InputError", "remove the nn.Softmax"),
        ("one-based-labels", "TargetOutOfRangeError", "The labels look 1-based"),
        ("bad-view", "BatchSizeMismatchError", "x.flatten(1)"),
        ("onehot", "TargetDtypeError", "target.argmax(dim=1)"),
    ],
)
def test_digits_bug_caught_at_first_step(
    digits: ModuleType, capsys: pytest.CaptureFixture[str], bug: str, error: str, fix: str
) -> None:
    assert digits.main(["--bug", bug]) == 1
    out = capsys.readouterr().out
    assert f"safeloss stopped training at step 1 with {error}:" in out
    assert fix in out


@pytest.mark.parametrize(
    ("bug", "stock_says"),
    [
        ("one-based-labels", "IndexError:\nTarget 10 is out of bounds."),
        ("bad-view", "ValueError:\nExpected input batch_size (256) to match target batch_size (64)."),
        ("onehot", "RuntimeError:\nExpected floating point type for target with class probabilities, got Long"),
    ],
)
def test_digits_stock_errors_for_comparison(
    digits: ModuleType, capsys: pytest.CaptureFixture[str], bug: str, stock_says: str
) -> None:
    assert digits.main(["--bug", bug, "--loss", "stock"]) == 1
    assert f"stock torch stopped training at step 1 with {stock_says}" in capsys.readouterr().out


def test_digits_stock_trains_through_softmax_silently(
    digits: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    assert digits.main(["--bug", "softmax", "--loss", "stock", "--epochs", "1"]) == 0
    assert "stopped" not in capsys.readouterr().out


def test_digits_runs_as_a_script() -> None:
    pytest.importorskip("sklearn")
    run = _run_script("examples/train_digits.py", "--epochs", "1", "--bug", "one-based-labels")
    assert run.returncode == 1, run.stderr
    assert "safeloss stopped training at step 1 with TargetOutOfRangeError" in run.stdout


# ------------------------------------------------------------------------------ causal_lm_loss


@pytest.fixture(scope="module")
def causal_lm() -> ModuleType:
    return _load("causal_lm_loss")


def test_causal_lm_default_mode(causal_lm: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    assert causal_lm.main([]) == 0
    out = capsys.readouterr().out
    assert "TargetShapeError: cross_entropy expects classes in dim 1" in out
    same = re.search(r"safeloss ([\d.]+) = stock ([\d.]+) = mean over the 10 real targets ([\d.]+)", out)
    assert same is not None and len(set(same.groups())) == 1, out
    assert "Fix: cross_entropy(..., ignore_index=-1)" in out
    assert "stock torch, reduction='mean': nan" in out
    assert 'SafeLossWarning: cross_entropy with reduction="mean" has nothing to average' in out
    assert "EmptyBatchError" not in out
    fixed = re.search(r"accumulated loss ([\d.]+), one-batch loss ([\d.]+), same gradients: True", out)
    assert fixed is not None and fixed.group(1) == fixed.group(2), out


def test_causal_lm_strict_mode(causal_lm: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    import safeloss

    assert causal_lm.main(["--strict"]) == 0
    out = capsys.readouterr().out
    assert "safeloss, strict mode: EmptyBatchError: cross_entropy with reduction=\"mean\"" in out
    assert "SafeLossWarning" not in out
    assert not safeloss.core.config.is_strict()  # the example does not leak strict mode


def test_causal_lm_runs_as_a_script() -> None:
    run = _run_script("examples/causal_lm_loss.py")
    assert run.returncode == 0, run.stderr
    assert "same gradients: True" in run.stdout
    assert run.stderr == ""  # every warning is shown on stdout, in order


# ------------------------------------------------------------------------------ docs


def _blocks(page: str) -> list[tuple[str, str | None]]:
    """(python code, the ```text output block right after it, if any) for each python block."""
    text = (ROOT / "docs" / page).read_text()
    pattern = re.compile(r"```python\n(.*?)```(?:\s*Output:\s*```text\n(.*?)```)?", re.S)
    return [(m.group(1), m.group(2)) for m in pattern.finditer(text)]


def test_myths_page_shows_real_outputs() -> None:
    """Every code block on docs/myths.md runs and prints exactly the output shown under it."""
    blocks = _blocks("myths.md")
    assert len(blocks) == 5 and all(out is not None for _, out in blocks)
    for code, shown in blocks:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            exec(compile(code, "docs/myths.md", "exec"), {"__name__": "myths"})
        assert buf.getvalue().rstrip("\n") == (shown or "").rstrip("\n"), code


def test_migration_snippets_are_valid_python() -> None:
    blocks = _blocks("migration.md")
    assert len(blocks) >= 3
    for code, _ in blocks:
        compile(code, "docs/migration.md", "exec")
