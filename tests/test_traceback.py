"""A SafeLossError's traceback ends at the user's call, not inside safeloss (safeloss.core._traceback)."""

from __future__ import annotations

import os
import sys
import traceback

import pytest
import torch
import torch.nn.functional as F

import safeloss
from safeloss.core import _traceback

# A bare re-raise keeps a replaced __traceback__ from Python 3.11 on; 3.10 shows the full one.
pytestmark = pytest.mark.skipif(sys.version_info < (3, 11), reason="traceback trimming needs Python 3.11+")

PKG = os.path.dirname(os.path.abspath(safeloss.__file__)) + os.sep
TORCH = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep


@pytest.fixture(autouse=True)
def _trimmed(monkeypatch):
    monkeypatch.delenv(_traceback.ENV, raising=False)


def frames(e: BaseException) -> list[traceback.FrameSummary]:
    return traceback.extract_tb(e.__traceback__)


def bad_view():
    return torch.randn(8, 5), torch.tensor([1, 3])  # 8 predictions, 2 labels


def assert_ends_here(e: BaseException, line: str) -> None:
    """The last frame is this file's ``line``, and no frame of safeloss or torch is left after it."""
    fs = frames(e)
    assert not [f for f in fs if f.filename.startswith(PKG)], [f.filename for f in fs]
    assert fs[-1].filename == __file__ and fs[-1].line == line, fs[-1]


def test_functional():
    with pytest.raises(safeloss.BatchSizeMismatchError) as e:
        safeloss.cross_entropy(*bad_view())
    assert_ends_here(e.value, "safeloss.cross_entropy(*bad_view())")


def test_module_forward_and_construction():
    loss_fn = safeloss.SafeCrossEntropyLoss()
    with pytest.raises(safeloss.BatchSizeMismatchError) as e:
        loss_fn(*bad_view())
    assert_ends_here(e.value, "loss_fn(*bad_view())")
    with pytest.raises(safeloss.ReductionError) as e:
        safeloss.SafeCrossEntropyLoss(reduction="avg")
    assert_ends_here(e.value, 'safeloss.SafeCrossEntropyLoss(reduction="avg")')


def test_patched_stock_calls(clean_patch):
    with safeloss.patch():
        with pytest.raises(safeloss.BatchSizeMismatchError) as e:
            F.cross_entropy(*bad_view())
        assert_ends_here(e.value, "F.cross_entropy(*bad_view())")
        stock_module = torch.nn.CrossEntropyLoss()
        with pytest.raises(safeloss.TargetOutOfRangeError) as e:
            stock_module(torch.randn(3, 4), torch.tensor([0, 9, 1]))
        assert_ends_here(e.value, "stock_module(torch.randn(3, 4), torch.tensor([0, 9, 1]))")


def test_check_pending(monkeypatch):
    monkeypatch.setattr(safeloss.core.checks, "DEFER_ON_CPU", True)  # CPU calls defer, as CUDA ones do
    try:
        safeloss.cross_entropy(torch.randn(3, 4), torch.tensor([0, 9, 1]))
        with pytest.raises(safeloss.TargetOutOfRangeError) as e:
            safeloss.check_pending()
        assert_ends_here(e.value, "safeloss.check_pending()")
    finally:
        safeloss.core.checks._pending.clear()


def test_strict_mode_and_value_errors():
    x = torch.randn(4, 3).softmax(1)
    with pytest.raises(safeloss.InputError, match="softmaxed") as e:
        safeloss.cross_entropy(x, torch.tensor([0, 1, 2, 0]), strict=True)
    assert_ends_here(e.value, "safeloss.cross_entropy(x, torch.tensor([0, 1, 2, 0]), strict=True)")


def test_the_error_itself_is_unchanged():
    """Trimming changes the frames only: the class, the message and the builtin base stay."""
    with pytest.raises(ValueError, match=r"got 8 predictions but 2 targets") as e:
        safeloss.cross_entropy(*bad_view())
    assert isinstance(e.value, safeloss.SafeLossError) and e.value.__cause__ is None


def test_environment_variable_restores_the_full_traceback(monkeypatch):
    monkeypatch.setenv(_traceback.ENV, "1")
    with pytest.raises(safeloss.BatchSizeMismatchError) as e:
        safeloss.cross_entropy(*bad_view())
    names = [os.path.basename(f.filename) for f in frames(e.value) if f.filename.startswith(PKG)]
    assert names[:2] == ["functional.py", "pipeline.py"] and names[-1] == "validation.py"


def test_other_exceptions_keep_their_traceback(monkeypatch):
    """Only a SafeLossError is about the caller's arguments; a bug of safeloss is shown in full."""
    def broken(*args, **kwargs):
        raise RuntimeError("a bug in safeloss")

    monkeypatch.setattr(safeloss.ce.pipeline, "normalize", broken)
    with pytest.raises(RuntimeError, match="a bug in safeloss") as e:
        safeloss.cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]))
    names = [os.path.basename(f.filename) for f in frames(e.value) if f.filename.startswith(PKG)]
    assert names == ["functional.py", "pipeline.py", "pipeline.py"]  # entry, run, _dense
    assert frames(e.value)[-1].filename == __file__  # broken() itself


def test_compiled_call_raises_the_same_error():
    """torch.compile traces the entry points untouched (nothing is trimmed while Dynamo traces,
    and the traceback of an error from traced code is Dynamo's): same class, same text."""
    torch._dynamo.reset()

    def step(x, t):
        return safeloss.cross_entropy(x, t) * 2

    compiled = torch.compile(step, backend="eager")
    with pytest.raises(safeloss.BatchSizeMismatchError, match=r"got 8 predictions but 2 targets"):
        compiled(*bad_view())
    assert torch.equal(compiled(torch.zeros(2, 3), torch.tensor([0, 1])), step(torch.zeros(2, 3), torch.tensor([0, 1])))


def test_the_switch_is_documented():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for page in ("README.md", os.path.join("docs", "migration.md")):
        with open(os.path.join(root, page)) as f:
            assert f"{_traceback.ENV}=1" in f.read(), page


def test_bodies_torchscript_parses_hold_no_try():
    """TorchScript parses the whole body of a forward and of the patched functions, and rejects a
    try even in a branch it does not compile: those trim with ``with boundary:`` instead."""
    import ast
    import importlib
    import inspect
    import textwrap

    patch = importlib.import_module("safeloss.patch")  # the module; safeloss.patch is the function

    for fn in (safeloss.SafeCrossEntropyLoss.forward, patch.cross_entropy, patch._forward):
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
        assert not any(isinstance(n, ast.Try) for n in ast.walk(tree)), fn.__qualname__
        assert any(isinstance(n, ast.With) for n in ast.walk(tree)), fn.__qualname__


def test_module_error_ends_at_the_users_line_inside_a_model_and_with_hooks():
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.loss = safeloss.SafeCrossEntropyLoss()

        def forward(self, x, t):
            return self.loss(x, t)

    model = Model()
    calls = []
    model.loss.register_forward_pre_hook(lambda m, args: calls.append("pre"))
    model.loss.register_forward_hook(lambda m, args, out: calls.append("post"))
    with pytest.raises(safeloss.BatchSizeMismatchError) as e:
        model(*bad_view())
    assert_ends_here(e.value, "return self.loss(x, t)")  # inside the user's forward, below model()
    assert "model(*bad_view())" in [f.line for f in frames(e.value)]  # the user's model's own call stays
    assert calls == ["pre"]
    model.loss(torch.randn(2, 5), torch.tensor([1, 2]))
    assert calls == ["pre", "pre", "post"]


def test_module_call_keeps_compile_fx_and_torchscript_working():
    torch._dynamo.reset()
    loss = safeloss.SafeCrossEntropyLoss()
    x, t = torch.randn(4, 5), torch.tensor([0, 1, 4, 2])
    want = loss(x, t)
    torch.testing.assert_close(torch.compile(loss, backend="eager", fullgraph=True)(x, t), want)
    torch.testing.assert_close(torch.compile(lambda a, b: loss(a, b), backend="eager", fullgraph=True)(x, t), want)
    compiled = safeloss.SafeCrossEntropyLoss()
    compiled.compile(backend="eager")
    torch.testing.assert_close(compiled(x, t), want)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.loss = safeloss.SafeCrossEntropyLoss()

        def forward(self, x, t):
            return self.loss(x, t)

    gm = torch.fx.symbolic_trace(Model())
    assert [n.op for n in gm.graph.nodes].count("call_module") == 1  # still a leaf call
    torch.testing.assert_close(gm(x, t), want)
    torch.testing.assert_close(torch.jit.script(Model())(x, t), want)


def test_patched_stock_module_gets_back_its_inherited_call(clean_patch):
    assert "__call__" not in torch.nn.CrossEntropyLoss.__dict__
    with safeloss.patch():
        assert "__call__" in torch.nn.CrossEntropyLoss.__dict__
    assert "__call__" not in torch.nn.CrossEntropyLoss.__dict__
    assert torch.nn.CrossEntropyLoss.__call__ is torch.nn.Module.__call__
