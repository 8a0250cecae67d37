"""What a new user meets first: the install, the command line, the demo, the GPU fallback notice."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys
import types
import warnings

import pytest
import torch

import safeloss
from safeloss import cli, demo
from safeloss.backends import dispatch

ROOT = pathlib.Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- packaging


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_triton_is_not_a_core_dependency_but_the_gpu_and_test_extras_bring_it():
    project = _pyproject()["project"]
    assert not [d for d in project["dependencies"] if d.startswith("triton")]
    extras = project["optional-dependencies"]
    for extra in ("gpu", "test"):  # test: the interpreter tests need it (.ci/run installs .[test])
        assert [d for d in extras[extra] if d.startswith("triton")], extra
    assert '".[test,' in (ROOT / ".ci" / "run").read_text()


def test_readme_install_lines_are_the_cpu_wheel_and_the_default_wheel():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, re.S)
    cpu, tests, gpu = blocks[:3]
    assert "pip install torch numpy --index-url https://download.pytorch.org/whl/cpu" in cpu
    assert "pip install -e . && safeloss demo" in cpu  # no extra: no triton for CPU users
    assert tests.strip().endswith("python -m pytest -q") and ".[test," in tests
    assert "pip install torch numpy && " in gpu and ".[gpu]" in gpu


def test_version_agrees_with_the_package_metadata():
    assert safeloss.__version__ == _pyproject()["project"]["version"]


def test_version_flag(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"safeloss {safeloss.__version__}"


def test_python_m_safeloss_version():
    out = subprocess.run(
        [sys.executable, "-m", "safeloss", "--version"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"safeloss {safeloss.__version__}"


def test_demo_piped_into_head_ends_quietly():
    """`safeloss demo | head`: the reader leaves early; no BrokenPipeError traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "safeloss", "demo", "--no-color"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.readline()
    proc.stdout.close()  # what head does after its lines
    err = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


# ---------------------------------------------------------------- the demo


def test_demo_only_finds_every_case_without_all(capsys):
    for case in demo.MORE_CASES + demo.CASES:
        assert cli.main(["demo", "--only", case.name, "--no-color"]) == 0, case.name
        assert f"({case.name})" in capsys.readouterr().out


@pytest.mark.parametrize("only,ops", [("lce-vocab-too-small", "linear_cross_entropy"),
                                      ("article-onehot", "cross_entropy"), (None, "cross_entropy")])
def test_demo_header_names_the_functions_its_cases_run(capsys, monkeypatch, only, ops):
    """The header says which stock and safeloss functions the columns run: the linear op's
    cases alone are not announced as cross_entropy."""
    monkeypatch.setenv("COLUMNS", "160")
    argv = ["demo", "--no-color"] + ([] if only is None else ["--only", only])
    assert cli.main(argv) == 0
    head = capsys.readouterr().out.splitlines()[1]
    assert head.endswith(f"Left: torch.nn.functional.{ops}. Right: safeloss.{ops}."), head


def test_demo_unknown_case_lists_every_case(capsys):
    assert cli.main(["demo", "--only", "no-such-case"]) == 2
    out = capsys.readouterr().out
    assert all(c.name in out for c in demo.CASES + demo.MORE_CASES)


def test_readme_counts_the_demo_cases():
    readme = (ROOT / "README.md").read_text()
    assert f"shows {len(demo.CASES)} cases" in readme
    total = len(demo.CASES) + len(demo.MORE_CASES) + len(demo.LINEAR_CASES)
    assert f"runs all {total} cases" in readme
    # Every other count of the demo's cases in the README (the --only sentence) agrees too.
    assert re.findall(r"from all (\d+)\b", readme) == [str(total)]


def test_demo_explains_its_meta_stand_in():
    for name in ("target-device", "weight-device"):
        case = next(c for c in demo.MORE_CASES if c.name == name)
        assert "'meta' tensor" in case.note and "stands in" in case.note


# ---------------------------------------------------------------- CUDA without triton


def _fake_cuda_problem() -> types.SimpleNamespace:
    """What dispatch.select reads of a Problem, for float32 logits on a CUDA device."""
    x = types.SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.float32, is_cuda=True)
    return types.SimpleNamespace(input=x, weight=None, num_classes=5)


def test_auto_on_cuda_without_triton_says_so_once_and_runs_torch(monkeypatch):
    monkeypatch.setattr(dispatch, "_TRITON_INSTALLED", [False])
    monkeypatch.setattr(dispatch, "_NOTICED", [])
    monkeypatch.setattr(dispatch, "in_functorch_transform", lambda x: False)
    with pytest.warns(UserWarning, match=r'(?s)pure-torch backend because the triton package is not installed.*pip install "safeloss\[gpu\]"') as w:
        assert dispatch.select("auto", _fake_cuda_problem()) == "torch"
    assert len(w) == 1 and w[0].filename == __file__  # the user's line, not safeloss's
    assert str(w[0].message).count("pip install") == 2  # one command and its alternative, once
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dispatch.select("auto", _fake_cuda_problem()) == "torch"  # once per process
    with pytest.raises(safeloss.BackendError, match=r'(?s)backend="triton" cannot run on cuda.*pip install "safeloss\[gpu\]"'):
        dispatch.select("triton", _fake_cuda_problem())


def test_no_notice_on_cpu_or_with_an_explicit_torch_backend(monkeypatch):
    monkeypatch.setattr(dispatch, "_TRITON_INSTALLED", [False])
    monkeypatch.setattr(dispatch, "_NOTICED", [])
    monkeypatch.setattr(dispatch, "in_functorch_transform", lambda x: False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dispatch.select("torch", _fake_cuda_problem()) == "torch"
        x, t = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
        safeloss.cross_entropy(x, t)  # CPU: torch is the backend, not a fallback
    assert dispatch._NOTICED == []


def test_pytest_ignores_only_named_warnings():
    """An ignore filter names a message or a module, so a new warning of the same class shows."""
    filters = _pyproject()["tool"]["pytest"]["ini_options"]["filterwarnings"]
    for f in filters:
        action, message, _category, module = (f.split(":") + ["", "", ""])[:4]
        if action == "ignore":
            assert message or module, f


def test_the_notice_does_not_break_fullgraph_tracing(monkeypatch):
    """Dynamo cannot trace warnings.warn: while it traces, the notice waits for an eager call."""
    monkeypatch.setattr(dispatch, "_NOTICED", [])
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, backend="eager")
    def step(x):
        dispatch._notice_fallback("the triton package is not installed")
        return x * 2

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(step(torch.ones(2)), torch.full((2,), 2.0))
    assert dispatch._NOTICED == []
    with pytest.warns(UserWarning, match="pure-torch backend"):
        dispatch._notice_fallback("the triton package is not installed")
