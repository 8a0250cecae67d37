"""Tests aimed at bugs a value-only suite lets through (found by mutation testing): strict-mode
precedence and ``SAFELOSS_STRICT`` parsing, the *effect* of ``inplace_backward`` / ``fused_grad``
(not just their values), int64 offsets in the kernels, detector tolerances and hint boundaries.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import safeloss
from safeloss import SafeLossWarning
from safeloss.backends import dispatch
from safeloss.core import config
from tests.test_differential import CPU_BACKENDS
from tests.tolerances import assert_matches

ROOT = Path(__file__).resolve().parents[1]
needs_triton_cpu = pytest.mark.skipif(
    dispatch.triton_unavailable_reason(torch.device("cpu")) is not None, reason="no Triton interpreter")


def _g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------ strict mode


def _raises_in_this_mode(**kw) -> bool:
    """Observable strictness: float labels warn in default mode and raise in strict mode."""
    x, t = torch.randn(3, 4, generator=_g()), torch.tensor([0.0, 1.0, 2.0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            safeloss.cross_entropy(x, t, **kw)
        except safeloss.TargetDtypeError:
            return True
    return False


def test_strict_mode_false_switches_off_a_global_true(monkeypatch):
    monkeypatch.delenv("SAFELOSS_STRICT", raising=False)
    safeloss.set_strict(True)
    assert _raises_in_this_mode()
    with safeloss.strict_mode(False):
        assert not _raises_in_this_mode() and not config.is_strict()
        assert _raises_in_this_mode(strict=True)  # the argument still wins
    assert _raises_in_this_mode()


def test_strict_mode_false_switches_off_the_environment(monkeypatch):
    monkeypatch.setenv("SAFELOSS_STRICT", "1")
    assert _raises_in_this_mode()
    with safeloss.strict_mode(False):
        assert not _raises_in_this_mode()
        with safeloss.strict_mode():  # nested blocks restore the outer one
            assert _raises_in_this_mode()
        assert not _raises_in_this_mode()
    assert _raises_in_this_mode()


def test_strict_false_argument_beats_everything(monkeypatch):
    monkeypatch.setenv("SAFELOSS_STRICT", "1")
    safeloss.set_strict(True)
    with safeloss.strict_mode(True):
        assert not _raises_in_this_mode(strict=False)
        assert not _raises_in_this_mode_module(strict=False)
        assert _raises_in_this_mode_module(strict=None)


def _raises_in_this_mode_module(strict):
    loss = safeloss.SafeCrossEntropyLoss(strict=strict)
    x, t = torch.randn(3, 4, generator=_g()), torch.tensor([0.0, 1.0, 2.0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            loss(x, t)
        except safeloss.TargetDtypeError:
            return True
    return False


@pytest.mark.parametrize("value", ["1", "true", "TRUE", "True", " yes ", "YES", "on", "On", "\ttrue\n"])
def test_environment_true_spellings(monkeypatch, value):
    monkeypatch.setenv("SAFELOSS_STRICT", value)
    assert config.is_strict() and _raises_in_this_mode()


@pytest.mark.parametrize("value", ["", "0", "false", "FALSE", "no", "off", " 0 ", "2", "strict", "y"])
def test_environment_false_spellings(monkeypatch, value):
    monkeypatch.setenv("SAFELOSS_STRICT", value)
    assert not config.is_strict() and not _raises_in_this_mode()


def test_environment_is_read_at_call_time(monkeypatch):
    monkeypatch.delenv("SAFELOSS_STRICT", raising=False)
    assert not _raises_in_this_mode()
    monkeypatch.setenv("SAFELOSS_STRICT", "yes")
    assert _raises_in_this_mode()


def test_set_strict_none_returns_to_the_environment(monkeypatch):
    monkeypatch.setenv("SAFELOSS_STRICT", "on")
    safeloss.set_strict(False)
    assert not _raises_in_this_mode()
    safeloss.set_strict(None)
    assert _raises_in_this_mode()


# ----------------------------------------------------------------- kernel options: their effects


def _logits_and_labels(n: int = 5, c: int = 7):
    x = torch.randn(n, c, generator=_g(1), dtype=torch.float64).float()
    t = torch.randint(0, c, (n,), generator=_g(2))
    t[1] = -100
    return x, t


def _reference_grad(x: torch.Tensor, t: torch.Tensor, reduction: str, up: torch.Tensor) -> torch.Tensor:
    xr = x.detach().double().requires_grad_()
    F.cross_entropy(xr, t, reduction=reduction, label_smoothing=0.1).backward(up.double())
    return xr.grad.float()


def _upstream(reduction: str, n: int) -> torch.Tensor:
    return torch.linspace(0.5, 2.0, n) if reduction == "none" else torch.tensor(1.5)


@needs_triton_cpu
@pytest.mark.parametrize("api", ["module", "functional"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_inplace_backward_writes_the_gradient_into_the_logits_storage(api, reduction):
    x, t = _logits_and_labels()
    up = _upstream(reduction, x.shape[0])
    want = _reference_grad(x, t, reduction, up)
    for flag in (True, False):
        leaf = x.clone().requires_grad_()
        h = leaf * 1.0  # the logits, as a layer's output
        kw = dict(reduction=reduction, label_smoothing=0.1, backend="triton", inplace_backward=flag)
        loss = (safeloss.SafeCrossEntropyLoss(**kw)(h, t) if api == "module"
                else safeloss.cross_entropy(h, t, **kw))
        (dh,) = torch.autograd.grad(loss, h, up)
        torch.testing.assert_close(dh, want, rtol=2e-5, atol=2e-6)
        if flag:  # the gradient lives in the logits' storage, which now holds it
            assert dh.data_ptr() == h.data_ptr()
            torch.testing.assert_close(h.detach(), want, rtol=2e-5, atol=2e-6)
        else:  # never touched otherwise
            assert dh.data_ptr() != h.data_ptr()
            assert torch.equal(h.detach(), x)


@needs_triton_cpu
@pytest.mark.parametrize("api", ["module", "functional"])
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_fused_grad_computes_the_gradient_in_forward(api, reduction):
    """Observable: overwrite the logits' data between forward and backward (no version bump). A
    backward that recomputes from the logits sees the new data; the fused one does not read them."""
    x, t = _logits_and_labels()
    up = _upstream(reduction, x.shape[0])
    want = _reference_grad(x, t, reduction, up)
    grads = {}
    for flag in (True, False):
        h = x.clone().requires_grad_()
        kw = dict(reduction=reduction, label_smoothing=0.1, backend="triton", fused_grad=flag)
        loss = (safeloss.SafeCrossEntropyLoss(**kw)(h, t) if api == "module"
                else safeloss.cross_entropy(h, t, **kw))
        h.data.fill_(3.0)  # what a later (unsafe) in-place update would do
        (grads[flag],) = torch.autograd.grad(loss, h, up)
    torch.testing.assert_close(grads[True], want, rtol=2e-5, atol=2e-6)
    assert not torch.allclose(grads[False], want, atol=1e-3)  # the observable works


@needs_triton_cpu
@pytest.mark.parametrize("setting", ["grad", "no_grad", "inference_mode", "no_requires_grad"])
def test_fused_grad_computes_a_gradient_only_where_backward_can_follow(monkeypatch, setting):
    """fused_grad=True writes the gradient in forward only when one can be asked for (grad mode on
    and logits that require grad): under no_grad / inference_mode (evaluation loops) it would be a
    logits-sized write and buffer for nothing."""
    from safeloss.backends import triton_backend as tb

    seen = []
    real = tb._apply_eager

    def spy(input, target, weight, cfg, reduce):
        seen.append(cfg[4])  # the fused flag the kernel is launched with
        return real(input, target, weight, cfg, reduce)

    monkeypatch.setattr(tb, "_apply_eager", spy)
    x, t = _logits_and_labels()
    h = x.clone().requires_grad_(setting != "no_requires_grad")
    ctx = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}.get(setting)
    with ctx() if ctx else torch.enable_grad():
        out = safeloss.cross_entropy(h, t, reduction="sum", backend="triton", fused_grad=True)
    torch.testing.assert_close(out.detach(), F.cross_entropy(x, t, reduction="sum"))
    assert seen == [setting == "grad"], seen


def test_module_passes_every_option_to_the_pipeline(monkeypatch):
    """The module's keyword-only options reach each call (a module that dropped one would pass
    every value test)."""
    from safeloss.ce import pipeline

    seen = {}

    def spy(*args, **kw):
        seen.update(kw)
        return torch.tensor(0.0)

    monkeypatch.setattr(pipeline, "run", spy)
    loss = safeloss.SafeCrossEntropyLoss(strict=True, backend="torch", inplace_backward=True, fused_grad=True)
    loss(torch.randn(2, 3), torch.tensor([0, 1]))
    assert seen["strict"] is True and seen["backend"] == "torch"
    assert seen["inplace_backward"] is True and seen["fused_grad"] is True and seen["owner"] is loss
    safeloss.cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]), strict=False, inplace_backward=True,
                           fused_grad=True)
    assert seen["strict"] is False and seen["inplace_backward"] is True and seen["fused_grad"] is True
    assert seen["owner"] is None


# ---------------------------------------------------------------------------- int64 kernel offsets
# The kernels compute offsets in int32 unless the launcher passes I64=True, which it must do
# whenever an index can pass int32 (any tensor a kernel reads or writes, padding lanes included).
# Two halves, each with a test that can fail: the kernels' code, specialised for I64=True, forms
# every address from int64 indices (static analysis below, and mutants of the code that it must
# reject), and the launchers set I64 exactly when some index can pass int32 (next section).

_KERNEL_MODULES = ("safeloss/backends/triton_kernels.py", "safeloss/parallel/triton_stats.py")
_STRIDE = re.compile(r"^[a-z]s_?[0-9a-z]$")  # the kernels' stride arguments: xs0, ts1, dsc, xs_r, ...


def _is_i64_flag(node: ast.AST) -> bool:
    return isinstance(node, ast.Name) and node.id == "I64"


class _Int64Offsets:
    """Data flow over the ``@triton.jit`` functions of one module, specialised for I64=True: which
    names hold int64 values. An expression is int64 when it casts to ``tl.int64``, calls a helper
    whose result is int64 under I64 (with the kernel's own I64 passed on), or combines an int64
    operand (Triton promotes int32 op int64 to int64). ``tl.load`` results and casts to other
    types are not. Straight-line code in order; ``if I64:`` takes its body; other branches keep
    what is int64 on both sides; loops what is int64 whether or not the body ran."""

    def __init__(self, src: str) -> None:
        tree = ast.parse(src)
        self.funcs = {f.name: f for f in tree.body if isinstance(f, ast.FunctionDef)
                      and any("jit" in ast.unparse(d) for d in f.decorator_list)}
        self.returns: dict[str, frozenset[int]] = {name: frozenset() for name in self.funcs}
        self.violations: set[str] = set()
        self.products = 0
        self.aranges: dict[str, set[str]] = {}
        for _ in range(10):  # helpers' results: iterate to a fixed point
            before = dict(self.returns)
            self.violations, self.products = set(), 0
            for name in self.funcs:
                self._function(name)
            if before == self.returns:
                break

    # expressions
    def _call(self, node: ast.Call, state: set[str]) -> bool:
        f = node.func
        if isinstance(f, ast.Attribute) and f.attr == "to":
            return bool(node.args) and isinstance(node.args[0], ast.Attribute) and node.args[0].attr == "int64"
        if isinstance(f, ast.Name) and f.id in self.funcs:
            return -1 in self._helper_result(node)
        if isinstance(f, ast.Attribute) and f.attr == "load":
            return False
        if any(isinstance(a, ast.Attribute) and a.attr == "int64" for a in [*node.args, *(k.value for k in node.keywords)]):
            return True  # tl.zeros(..., tl.int64), tl.full(..., tl.int64)
        return any(self._expr(a, state) for a in node.args)

    def _helper_result(self, node: ast.Call) -> frozenset[int]:
        """Positions of the helper's result that are int64 (-1: a single value), given that the
        call passes the kernel's I64 flag (a helper called with I64=False returns int32)."""
        f = self.funcs[node.func.id]  # type: ignore[union-attr]
        params = [a.arg for a in f.args.args]
        if "I64" in params:
            i = params.index("I64")
            passed = node.args[i] if i < len(node.args) else next(
                (k.value for k in node.keywords if k.arg == "I64"), None)
            if passed is None or not _is_i64_flag(passed):
                return frozenset()
        return self.returns[node.func.id]  # type: ignore[union-attr]

    def _expr(self, node: ast.AST | None, state: set[str]) -> bool:
        if isinstance(node, ast.Name):
            return node.id in state
        if isinstance(node, ast.Call):
            return self._call(node, state)
        if isinstance(node, ast.BinOp):
            return self._expr(node.left, state) or self._expr(node.right, state)
        if isinstance(node, ast.Subscript):
            return self._expr(node.value, state)
        if isinstance(node, ast.UnaryOp):
            return self._expr(node.operand, state)
        if isinstance(node, ast.IfExp):
            return self._expr(node.body, state) and self._expr(node.orelse, state)
        return False

    def _scan(self, fname: str, node: ast.AST, state: set[str]) -> None:
        """Record address arithmetic that is not int64: a stride times a non-int64 index, and (in
        kernels) a pointer plus a non-int64, non-constant offset."""
        for sub in ast.walk(node):
            if not isinstance(sub, ast.BinOp):
                continue
            if isinstance(sub.op, ast.Mult):
                for a, b in ((sub.left, sub.right), (sub.right, sub.left)):
                    if isinstance(a, ast.Name) and _STRIDE.match(a.id):
                        self.products += 1
                        if not self._expr(b, state):
                            self.violations.add(f"{fname}:{sub.lineno}: {ast.unparse(sub)}")
            if isinstance(sub.op, ast.Add) and fname.endswith("_kernel") and isinstance(sub.left, ast.Name) \
                    and sub.left.id.endswith("_ptr"):
                off = sub.right
                const = isinstance(off, ast.Constant) or (isinstance(off, ast.Name) and (
                    off.id.isupper() or off.id in self.aranges.get(fname, set())))
                if not const and not self._expr(off, state):
                    self.violations.add(f"{fname}:{sub.lineno}: {ast.unparse(sub)}")

    # statements
    def _assign(self, targets: list[ast.AST], value: ast.AST, state: set[str]) -> None:
        for tgt in targets:
            if isinstance(tgt, ast.Name):
                (state.add if self._expr(value, state) else state.discard)(tgt.id)
            elif isinstance(tgt, ast.Tuple):
                res = self._helper_result(value) if isinstance(value, ast.Call) and isinstance(
                    value.func, ast.Name) and value.func.id in self.funcs else frozenset()
                for i, el in enumerate(tgt.elts):
                    if isinstance(el, ast.Name):
                        (state.add if i in res else state.discard)(el.id)

    def _block(self, fname: str, stmts: list[ast.stmt], state: set[str], rets: list[frozenset[int]]) -> set[str]:
        state = set(state)
        for st in stmts:
            if isinstance(st, ast.Assign):
                self._scan(fname, st.value, state)
                self._assign(st.targets, st.value, state)
            elif isinstance(st, ast.AugAssign):
                self._scan(fname, st.value, state)
                if isinstance(st.target, ast.Name) and self._expr(st.value, state):
                    state.add(st.target.id)
            elif isinstance(st, ast.If):
                self._scan(fname, st.test, state)
                if _is_i64_flag(st.test):
                    state = self._block(fname, st.body, state, rets)
                elif isinstance(st.test, ast.UnaryOp) and isinstance(st.test.op, ast.Not) and _is_i64_flag(st.test.operand):
                    state = self._block(fname, st.orelse, state, rets)
                else:
                    state = self._block(fname, st.body, state, rets) & self._block(fname, st.orelse, state, rets)
            elif isinstance(st, (ast.For, ast.While)):
                self._scan(fname, st.iter if isinstance(st, ast.For) else st.test, state)
                entry = set(state)
                if isinstance(st, ast.For) and isinstance(st.target, ast.Name):
                    entry.discard(st.target.id)  # range() over int32 bounds
                for _ in range(2):  # the second pass sees what the first left for the next iteration
                    entry &= self._block(fname, st.body, entry, rets)
                state &= entry
            elif isinstance(st, ast.Return) and st.value is not None:
                self._scan(fname, st.value, state)
                elts = st.value.elts if isinstance(st.value, ast.Tuple) else None
                rets.append(frozenset(i for i, e in enumerate(elts) if self._expr(e, state)) if elts is not None
                            else frozenset({-1}) if self._expr(st.value, state) else frozenset())
            else:
                self._scan(fname, st, state)
        return state

    def _function(self, name: str) -> None:
        # Names only ever bound to tl.arange(0, N): indices below a compile-time constant.
        binds: dict[str, list[ast.AST]] = {}
        for node in ast.walk(self.funcs[name]):
            if isinstance(node, ast.Assign):
                for tgt in node.targets:
                    if isinstance(tgt, ast.Name):
                        binds.setdefault(tgt.id, []).append(node.value)
        self.aranges[name] = {n for n, vs in binds.items() if all(
            isinstance(v, ast.Call) and isinstance(v.func, ast.Attribute) and v.func.attr == "arange" for v in vs)}
        rets: list[frozenset[int]] = []
        self._block(name, self.funcs[name].body, set(), rets)
        self.returns[name] = frozenset.intersection(*rets) if rets else frozenset()


def _kernel_sources() -> dict[str, str]:
    return {m: (ROOT / m).read_text() for m in _KERNEL_MODULES}


def test_kernel_offsets_are_int64_under_i64():
    """Specialised for I64=True, every stride product and every kernel's pointer offset is int64."""
    total = 0
    for module, src in _kernel_sources().items():
        a = _Int64Offsets(src)
        assert not a.violations, f"{module}: int32 index in address arithmetic under I64:\n" + "\n".join(
            sorted(a.violations))
        total += a.products
        kernels = [f for n, f in a.funcs.items() if n.endswith("_kernel")]
        assert kernels, module
        for f in kernels:  # every kernel takes the flag (a new kernel without it would be int32 only)
            assert "I64" in [x.arg for x in f.args.args], f"{module}: {f.name} has no I64 parameter"
    assert total >= 40, "the kernels' stride arguments were renamed: update _STRIDE"


# (module, code, mutant): one cast or flag dropped; each occurrence of the code is mutated in turn.
_DROPPED_CASTS = [
    (0, "return v.to(tl.int64)", "return v.to(tl.int32)"),  # _offset's I64 branch
    (0, "o = _offset(o, I64)", "o = o"),  # the (i0, i1) pair
    (0, "i2 = _offset(b, I64) * BLOCK_P", "i2 = b * BLOCK_P"),  # the block of positions
    (0, "cols = c0 + _offset(tl.arange(0, BLOCK_C), I64)", "cols = c0 + tl.arange(0, BLOCK_C)"),
    (0, "wcols = c0 + _offset(tl.arange(0, BLOCK_C), I64)", "wcols = c0 + tl.arange(0, BLOCK_C)"),
    (0, "_offset(cols, I64)[None, :] * dsc", "cols[None, :] * dsc"),  # fused single-block row
    (0, "y_safe = _offset(tl.where(use, y, 0), I64)", "y_safe = tl.where(use, y, 0).to(tl.int32)"),
    (0, "_positions(S1, S2, n_pblocks, BLOCK_P, I64)", "_positions(S1, S2, n_pblocks, BLOCK_P, False)"),
    (0, "_index_target(t_ptr, trow, pmask, ignore_index, C, I64)",
     "_index_target(t_ptr, trow, pmask, ignore_index, C, False)"),
    (1, "pid = pid.to(tl.int64)", "pid = pid.to(tl.int32)"),
    (1, "cols = c0 + tl.arange(0, BLOCK_C).to(tl.int64)", "cols = c0 + tl.arange(0, BLOCK_C)"),
    (1, "    if I64:\n", "    if False:\n"),
]


def _mutants():
    srcs = _kernel_sources()
    for m, old, new in _DROPPED_CASTS:
        src = srcs[_KERNEL_MODULES[m]]
        count = src.count(old)
        assert count, f"{_KERNEL_MODULES[m]} no longer contains {old!r}: update _DROPPED_CASTS"
        for k in range(count):
            at = -1
            for _ in range(k + 1):
                at = src.index(old, at + 1)
            yield f"{old.strip()} [{k}]", src[:at] + new + src[at + len(old):]


def test_the_int64_check_catches_a_dropped_cast():
    mutants = list(_mutants())
    assert len(mutants) >= 15
    missed = [name for name, src in mutants if not _Int64Offsets(src).violations]
    assert not missed, f"mutants with an int32 offset that the check accepts: {missed}"


# ---------------------------------------------------------------- the launchers' choice of I64
_M = 2**31 - 1  # the largest int32


def _recorded_i64(monkeypatch, launcher, *args) -> bool:
    """Run a launcher on meta tensors with the kernels replaced by a recorder; the I64 it passed."""
    import types

    from safeloss.backends import triton_backend as tb

    seen = []

    class Rec:
        def __getitem__(self, grid):
            return lambda *args, **kw: seen.append(kw["I64"])

    fake = types.SimpleNamespace(ce_fwd_kernel=Rec(), ce_bwd_kernel=Rec(), ce_scale_kernel=Rec())
    monkeypatch.setattr(tb, "_kernels", lambda: fake)
    launcher(*args)
    assert len(seen) == 1
    return seen[0]


def _strided(shape, stride, dtype=torch.float32):
    return torch.empty_strided(shape, stride, device="meta", dtype=dtype)


# Each tensor of each launcher in turn gets the largest offset int32 holds, then one more (the same
# shapes, another stride: a launch configuration cached by signature must not be reused).
# Logits-shaped tensors are (2, 8), position-shaped (2,): offsets 1 * s + 7, resp. 1 * s.
_EDGE = [(_M - 7, _M), (_M - 6, _M + 1)]


@needs_triton_cpu
@pytest.mark.parametrize("role", ["x", "target", "prob-target", "dx"])
def test_forward_takes_int64_when_a_tensor_passes_int32(monkeypatch, role):
    from safeloss.backends import triton_backend as tb

    got = []
    for s_logits, s_pos in _EDGE:
        x = _strided((2, 8), (s_logits if role == "x" else 8, 1))
        prob = role == "prob-target"
        t = _strided((2, 8), (s_logits if prob else 8, 1)) if prob else _strided(
            (2,), (s_pos if role == "target" else 1,), torch.int64)
        dx = _strided((2, 8), (s_logits, 1)) if role == "dx" else None
        lse, flags = _strided((2,), (1,)), _strided((8,), (1,), torch.int32)
        got.append(_recorded_i64(monkeypatch, tb._launch_fwd, x, t, None, lse, lse, lse, dx, flags, -100, 0.0,
                                 prob, True, float("inf")))
    assert got == [False, True]


@needs_triton_cpu
@pytest.mark.parametrize("role", ["x", "target", "prob-target", "g", "dx", "dy"])
def test_backward_takes_int64_when_a_tensor_passes_int32(monkeypatch, role):
    from safeloss.backends import triton_backend as tb

    got = []
    for s_logits, s_pos in _EDGE:
        x = _strided((2, 8), (s_logits if role == "x" else 8, 1))
        prob = role in ("prob-target", "dy")
        t = _strided((2, 8), (s_logits if role == "prob-target" else 8, 1)) if prob else _strided(
            (2,), (s_pos if role == "target" else 1,), torch.int64)
        g = _strided((2,), (s_pos if role == "g" else 1,))
        dx = _strided((2, 8), (s_logits if role == "dx" else 8, 1))
        dy = _strided((2, 8), (s_logits, 1)) if role == "dy" else None
        lse = _strided((2,), (1,))
        got.append(_recorded_i64(monkeypatch, tb._launch_bwd, x, t, None, lse, lse, g, dx, dy, -100, 0.0, prob))
        got.append(_recorded_i64(monkeypatch, tb._launch_scale, dx, t, g, -100, prob))
    want_scale = role in ("target", "prob-target", "g", "dx")  # the rescale reads dx, target and g
    assert got == [False, False, True, want_scale]


@needs_triton_cpu
@pytest.mark.parametrize("kernel", ["fwd", "bwd", "scale"])
def test_int64_for_positions_and_classes_past_int32(monkeypatch, kernel):
    """Fully expanded logits (every offset 0) over more positions or classes than int32 indexes
    (the per-position buffers, the class loop), and the forward's softmax sample arithmetic."""
    from safeloss.backends import triton_backend as tb
    from safeloss.core._flags import SOFTMAX_SAMPLE

    def run(n: int, c: int) -> bool:
        x = _strided((n, c), (0, 0))
        t = _strided((n,), (0,), torch.int64)
        g = _strided((n,), (0,))
        lse, flags = _strided((n,), (0,)), _strided((8,), (1,), torch.int32)
        if kernel == "fwd":
            return _recorded_i64(monkeypatch, tb._launch_fwd, x, t, None, lse, lse, lse, None, flags, -100, 0.0,
                                 False, True, float("inf"))
        if kernel == "bwd":
            return _recorded_i64(monkeypatch, tb._launch_bwd, x, t, None, lse, lse, g, x, None, -100, 0.0, False)
        return _recorded_i64(monkeypatch, tb._launch_scale, x, t, g, -100, False)

    assert run(_M + 1, 1) is (kernel == "fwd")  # the last position is _M (the forward: its sample)
    assert run(_M + 2, 1) is True
    assert run(1, _M + 1) is False  # the last class is _M
    assert run(1, _M + 2) is True
    if kernel == "fwd":
        n = _M // (SOFTMAX_SAMPLE + 1)  # positions * (SOFTMAX_SAMPLE + 1) must fit int32
        assert (run(n, 2), run(n + 1, 2)) == (False, True)


@needs_triton_cpu
def test_vocab_parallel_statistics_take_int64_past_int32(monkeypatch):
    from safeloss.parallel import triton_stats

    seen = []

    class Rec:
        def __getitem__(self, grid):
            return lambda *args, **kw: seen.append(kw["I64"])

    monkeypatch.setattr(triton_stats, "shard_stats_kernel", Rec())
    for shape, stride in [((2, 8), (_M - 7, 1)), ((2, 8), (_M - 6, 1)),  # row stride
                          ((8, 2), (1, _M - 7)), ((8, 2), (1, _M - 6)),  # class stride
                          ((_M + 1, 64), (0, 1)), ((_M + 2, 64), (0, 1)),  # expanded rows: the (R,) outputs
                          ((1, _M + 1), (0, 0)), ((1, _M + 2), (0, 0))]:  # expanded classes
        triton_stats.shard_stats(_strided(shape, stride), None, False)
    assert seen == [False, True] * 4


_HUGE_STRIDE_SCRIPT = textwrap.dedent("""
    import os, sys, tempfile
    import torch, torch.nn.functional as F
    from safeloss.backends import triton_backend as tb

    C, n = 8, 2**31 + 64 * 8
    with tempfile.NamedTemporaryFile() as f:
        f.truncate(n * 2)  # sparse: only the pages written below use memory
        storage = torch.from_file(f.name, shared=True, size=n, dtype=torch.float16)
        layouts = {"rows": ((3, C), (2**30, 1)), "nchw": ((3, C, 2), (2**30, 2, 1)),
                   "classes": ((2, 3), (1, 2**30))}
        failed = []
        for name, (shape, stride) in layouts.items():
            for fused in (False, True):
                x = storage.as_strided(shape, stride)
                x.copy_(torch.randn(shape, generator=torch.Generator().manual_seed(0)).half())
                t = torch.arange(x.numel() // x.shape[1]).reshape((x.shape[0],) + x.shape[2:]) % x.shape[1]
                h = x.detach().requires_grad_()
                losses, _ = tb.row_losses(h, t, weight=None, ignore_index=-100, label_smoothing=0.0,
                                          prob_target=False, fused_grad=fused)
                g = torch.rand(losses.shape, generator=torch.Generator().manual_seed(1))
                (dx,) = torch.autograd.grad(losses, h, g)
                xr = x.float().requires_grad_()
                ref = F.cross_entropy(xr, t, reduction="none")
                (rdx,) = torch.autograd.grad(ref, xr, g)
                if not (torch.allclose(losses, ref, atol=1e-3) and torch.allclose(dx.float(), rdx, atol=1e-3)):
                    failed.append((name, fused))
        print("failed:", failed)
        sys.exit(1 if failed else 0)
""")


@needs_triton_cpu
def test_kernels_address_past_2_31_elements_on_the_interpreter(tmp_path):
    """Views whose strides put elements past 2**31 of a sparse, file-backed storage (4 GiB of
    address space, a few pages of memory): int32 offset arithmetic would read the wrong rows, or
    crash, hence the subprocess."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", _HUGE_STRIDE_SCRIPT], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    if r.returncode != 0 and "from_file" in r.stderr:
        pytest.skip(f"no sparse file-backed storage here: {r.stderr[-300:]}")
    assert r.returncode == 0, f"rc={r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"


# ------------------------------------------------------------------------- checks and boundaries


@pytest.mark.parametrize("ignore_index", [0, 1, 4])
def test_ignore_index_zero_or_positive_with_probability_targets_raises(ignore_index):
    x, y = torch.randn(3, 5, generator=_g()), torch.rand(3, 5, generator=_g(1)).softmax(1)
    with pytest.raises(safeloss.IgnoreIndexError, match=rf"ignore_index={ignore_index} cannot be used with probability targets"):
        safeloss.cross_entropy(x, y, ignore_index=ignore_index)
    with pytest.raises(RuntimeError, match="ignore_index is not supported"):
        F.cross_entropy(x, y, ignore_index=ignore_index)


@pytest.mark.parametrize("ignore_index", [-1, -100])
def test_negative_ignore_index_with_probability_targets_is_fine(ignore_index):
    x, y = torch.randn(3, 5, generator=_g()), torch.rand(3, 5, generator=_g(1)).softmax(1)
    torch.testing.assert_close(safeloss.cross_entropy(x, y, ignore_index=ignore_index),
                               F.cross_entropy(x, y, ignore_index=ignore_index))


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan"), 1.5, -0.5])
def test_non_whole_float_labels_raise(bad):
    t = torch.tensor([0.0, 2.0, bad, 1.0])
    with pytest.raises(safeloss.TargetDtypeError, match=r"not whole class numbers: 1 value with a fraction or NaN/inf: \S+ at \[2\]"):
        safeloss.cross_entropy(torch.randn(4, 3, generator=_g()), t)


def test_whole_float_labels_convert_with_a_warning():
    x, t = torch.randn(4, 3, generator=_g()), torch.tensor([0.0, 2.0, 1.0, 1.0])
    with pytest.warns(SafeLossWarning, match="stored as torch.float32"):
        got = safeloss.cross_entropy(x, t)
    torch.testing.assert_close(got, F.cross_entropy(x, t.long()))


def _out_of_range_message(labels: list[int], C: int, **kw) -> str:
    with pytest.raises(safeloss.TargetOutOfRangeError) as e:
        safeloss.cross_entropy(torch.randn(len(labels), C, generator=_g()), torch.tensor(labels), **kw)
    return str(e.value)


def test_one_based_hint_needs_labels_1_to_C_without_0():
    assert "look 1-based: they run from 1 to 5" in _out_of_range_message([1, 2, 5, 3], 5)
    assert "look 1-based: they run from 2 to 5" in _out_of_range_message([2, 5, 3], 5)


@pytest.mark.parametrize("labels", [[0, 1, 5, 3], [0, 5], [1, 2, 6], [1, 6, 5]])
def test_no_one_based_hint_when_0_occurs_or_labels_exceed_C(labels):
    msg = _out_of_range_message(labels, 5)
    assert "1-based" not in msg
    assert f"go up to {max(labels)}" in msg and f"{max(labels) + 1} outputs" in msg


def test_one_based_hint_ignores_the_ignored_label():
    msg = _out_of_range_message([1, 5, 0, 2, 3], 5, ignore_index=0)
    assert "look 1-based: they run from 1 to 5" in msg
    # two labels of five classes: 0's absence says nothing, and the message says so
    msg = _out_of_range_message([1, 5, 0], 5, ignore_index=0)
    assert "look 1-based" not in msg and "too few of the 5 classes to tell" in msg


@pytest.mark.parametrize("code", [255, -1])
def test_mask_code_hint_only_when_it_is_the_only_bad_value(code):
    assert f"Every bad value is {code}" in _out_of_range_message([0, code, 2], 5)
    assert "Every bad value" not in _out_of_range_message([0, code, 7], 5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype, off, flagged", [
    (torch.float32, 5e-5, True), (torch.float32, 1e-3, False),
    (torch.float64, 5e-7, True), (torch.float64, 1e-5, False),
    (torch.float16, 1e-3, True), (torch.float16, 6e-2, False),
])
def test_softmax_detector_tolerance_per_dtype(backend, dtype, off, flagged):
    """Rows in [0, 1] that sum to 1 + off: softmaxed input within the dtype's rounding, or not.
    A detector several times too loose flags ordinary near-normalized scores."""
    p = torch.rand(16, 8, generator=_g(), dtype=torch.float64).softmax(1) * 0.5
    p[:, 0] += 1 - p.sum(1) + off  # exact sum 1 + off, every entry still in [0, 1]
    x = p.to(dtype)
    t = torch.randint(0, 8, (16,), generator=_g(1))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        safeloss.cross_entropy(x, t, backend=backend)
    hit = any("looks already softmaxed" in str(w.message) for w in seen)
    assert hit is flagged, (dtype, off, float(x.double().sum(1).max() - 1))


@pytest.mark.parametrize("eps, hint", [(50, "label_smoothing=0.5"), (100, "label_smoothing=1"), (2, "label_smoothing=0.02")])
def test_label_smoothing_percentage_hint_up_to_100(eps, hint):
    with pytest.raises(safeloss.LabelSmoothingError, match=rf"If you meant a percentage, {hint}\."):
        safeloss.cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]), label_smoothing=eps)


def test_no_percentage_hint_above_100():
    with pytest.raises(safeloss.LabelSmoothingError) as e:
        safeloss.cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]), label_smoothing=101)
    assert "percentage" not in str(e.value)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("off, flagged", [(5e-2, True), (-5e-2, True), (5e-3, False)])
def test_probability_target_sum_tolerance(backend, off, flagged):
    """Targets made in half precision are off by ~1e-3 (fine); counts or logits by far more."""
    y = torch.rand(6, 5, generator=_g(), dtype=torch.float64).softmax(1)
    y = (y * (1 + off)).float()
    x = torch.randn(6, 5, generator=_g(1))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        got = safeloss.cross_entropy(x, y, backend=backend)
    hit = any("not probability distributions" in str(w.message) for w in seen)
    assert hit is flagged
    torch.testing.assert_close(got, F.cross_entropy(x, y))


def test_target_on_another_device_is_named():
    with pytest.raises(safeloss.DeviceMismatchError, match=r"(?s)input is on cpu, target is on meta.*target = target.to\(input.device\)"):
        safeloss.cross_entropy(torch.randn(2, 3), torch.tensor([0, 1], device="meta"))


def test_weight_with_C_entries_in_a_non_vector_shape_is_rejected():
    """(1, C) and (C, 1) are class weights; (2, 2) for C = 4 is not obviously one."""
    with pytest.raises(safeloss.WeightError, match=r"weight has shape \(2, 2\) but the input has 4 classes"):
        safeloss.cross_entropy(torch.randn(3, 4), torch.tensor([0, 1, 2]), weight=torch.ones(2, 2))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("xdtype, ydtype", [(torch.float32, torch.float64), (torch.float16, torch.float32),
                                            (torch.bfloat16, torch.float32)])
def test_probability_targets_promote_the_result_dtype(backend, xdtype, ydtype):
    """Stock computes with probability targets in the promoted dtype (float32 logits with float64
    targets give a float64 loss); per-row losses cast back to the logits' dtype would lose it."""
    x = torch.randn(4, 5, generator=_g(), dtype=torch.float64).to(xdtype)
    y = torch.rand(4, 5, generator=_g(1), dtype=torch.float64).softmax(1).to(ydtype)
    for reduction in ("mean", "none"):
        want = F.cross_entropy(x, y, reduction=reduction)
        got = safeloss.cross_entropy(x, y, reduction=reduction, backend=backend)
        assert got.dtype == want.dtype == torch.promote_types(xdtype, ydtype)
        torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)


def test_weight_that_requires_grad_works_with_probability_targets():
    x = torch.randn(4, 5, generator=_g())
    y = torch.rand(4, 5, generator=_g(1)).softmax(1)
    w1, w2 = (torch.rand(5, generator=_g(2)) + 0.5).requires_grad_(), None
    w2 = w1.detach().clone().requires_grad_()
    F.cross_entropy(x, y, weight=w1).backward()
    safeloss.cross_entropy(x, y, weight=w2).backward()
    torch.testing.assert_close(w2.grad, w1.grad)
    with pytest.raises(safeloss.WeightError, match="not differentiable with respect to the class weights"):
        safeloss.cross_entropy(x, torch.tensor([0, 1, 2, 3]), weight=w2)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_softmax_warning_needs_every_sampled_row_to_look_softmaxed(backend):
    """Row 0 exactly softmaxed (passes the cheap first-row test), the others in [0, 1] but off by
    1e-3 in their sum: beyond the fp32 tolerance, so the input is not reported as softmaxed."""
    p = torch.rand(16, 8, generator=_g(), dtype=torch.float64).softmax(1) * 0.5
    p[1:, 0] += 1 - p[1:].sum(1) + 1e-3
    p[0, 0] += 1 - p[0].sum()
    x, t = p.float(), torch.randint(0, 8, (16,), generator=_g(1))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        safeloss.cross_entropy(x, t, backend=backend)
    assert not any("looks already softmaxed" in str(w.message) for w in seen)
    p[1:, 0] -= 1e-3  # now every row sums to 1: reported
    with pytest.warns(SafeLossWarning, match="looks already softmaxed"):
        safeloss.cross_entropy(p.float(), t, backend=backend)


# ------------------------------------------------------------------------- validation mutation proof
# Tests for mutants of safeloss/core/validation.py and checks.py that the suite let through
# (mutants-validation.md lists them).


@pytest.mark.parametrize("eps", [0, 1, np.float64(0.0), np.int64(1), np.float32(1.0)], ids=repr)
def test_label_smoothing_bounds_accepted_in_every_number_type(eps):
    """Class: label_smoothing range. The ends of [0, 1] are valid however the number is spelled
    (an int 0 or 1, a NumPy scalar), as stock torch takes them: the check of non-float values must
    not exclude an end of the range."""
    x, t = torch.randn(3, 4, generator=_g()), torch.tensor([0, 1, 2])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = safeloss.cross_entropy(x, t, label_smoothing=eps, strict=True)
        mod = safeloss.SafeCrossEntropyLoss(label_smoothing=eps)(x, t)
    want = F.cross_entropy(x, t, label_smoothing=float(eps))
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(mod, want)


@pytest.mark.parametrize("size_average, reduce", [(False, None), (None, False), (True, None), (None, True),
                                                  (False, True), (True, False)])
def test_legacy_size_average_and_reduce_alone_follow_torch(size_average, reduce):
    """Class: reduction names (torch's legacy precedence). Either legacy argument on its own
    overrides ``reduction``, exactly as torch.nn._reduction.legacy_get_string decides."""
    x, t = torch.randn(4, 3, generator=_g()), torch.tensor([0, 2, 1, 2])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = F.cross_entropy(x, t, size_average=size_average, reduce=reduce)
        got = safeloss.cross_entropy(x, t, size_average=size_average, reduce=reduce)
        mod = safeloss.SafeCrossEntropyLoss(size_average=size_average, reduce=reduce)(x, t)
    assert got.shape == want.shape == mod.shape
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(mod, want)


@pytest.mark.parametrize("ishape, tshape", [((1, 3), (1, 1)), ((1, 3, 2, 2), (1, 1, 2, 2)), ((2, 3, 1), (2, 1, 1))])
def test_singleton_label_dim_squeezes_dim_1_only(ishape, tshape):
    """Class: shape mismatch, (N, 1) targets. Only the label column (dim 1) is squeezed: a batch
    of one or a spatial size of 1 keeps its dimension, so reduction="none" has stock's shape."""
    x = torch.randn(*ishape, generator=_g())
    t = torch.randint(0, 3, tshape, generator=_g(1))
    want = F.cross_entropy(x, t.squeeze(1), reduction="none")
    with pytest.warns(SafeLossWarning, match=r"squeezes the singleton dimension"):
        got = safeloss.cross_entropy(x, t, reduction="none")
    assert got.shape == want.shape
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("fill", [0, 1])
def test_one_class_labels_of_the_input_shape_are_a_label_column(fill):
    """Class: one-hot detection vs (N, 1) targets. With one class, an (N, 1) integer target has the
    input's shape but is a column of labels (stock: "0D or 1D target tensor expected"), never a
    one-hot matrix: default mode squeezes it, as for any C."""
    x = torch.randn(4, 1, generator=_g())
    t = torch.full((4, 1), fill)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        try:
            safeloss.cross_entropy(x, t)
        except safeloss.TargetOutOfRangeError:
            assert fill == 1  # label 1 of one class: out of range, as stock's IndexError
        else:
            assert fill == 0
    texts = [str(w.message) for w in seen if issubclass(w.category, SafeLossWarning)]
    assert any("squeezes the singleton dimension" in m for m in texts), texts
    assert not any("one-hot" in m for m in texts), texts


@pytest.mark.parametrize("rows", [4, 2048])  # the direct count, and the amin pass of large targets
def test_probability_row_with_nan_and_a_negative_entry_counts_as_negative(rows):
    """Class: probability-target rows. A row whose minimum is NaN hides its negative entry from
    the amin pass of large targets; it is still counted as a row with negative entries, as the
    direct count of small targets does."""
    y = torch.full((rows, 5), 0.2)
    y[1] = torch.tensor([float("nan"), -0.5, 0.5, 0.5, 0.5])
    with pytest.raises(safeloss.ProbabilityTargetError,
                       match=r"(?s)1 row with negative entries \(min -0\.5\) and 1 row with NaN or infinite entries"):
        safeloss.cross_entropy(torch.randn(rows, 5, generator=_g()), y, strict=True)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_softmax_output_with_exact_zeros_is_detected(backend):
    """Class: softmaxed-input detection thresholds. A masked softmax (-inf logits) has entries of
    exactly 0: they lie in [0, 1], so the rows are still softmax outputs."""
    logits = torch.randn(8, 6, generator=_g())
    logits[:, 4:] = float("-inf")
    x = logits.softmax(1)
    assert (x == 0).any()
    with pytest.warns(SafeLossWarning, match="looks already softmaxed"):
        safeloss.cross_entropy(x, torch.randint(0, 4, (8,), generator=_g(1)), backend=backend)


@pytest.mark.parametrize("weighted", [False, True])
def test_all_ignored_with_a_class_weight_is_still_all_ignored(weighted):
    """Class: empty batch / all ignored. With every target ignored, a class weight plays no part:
    the message names ignore_index and says the gradients are zero, not NaN."""
    x = torch.randn(3, 4, generator=_g())
    w = torch.ones(4) if weighted else None
    with pytest.raises(safeloss.EmptyBatchError, match=r"(?s)all 3 targets equal ignore_index=-100.*Gradients are zero") as e:
        safeloss.cross_entropy(x, torch.full((3,), -100), w, strict=True)
    assert "class weight 0" not in str(e.value)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_softmaxed_binary_logits_are_detected(backend):
    """Class: softmaxed-input detection thresholds (the class count). Two classes are the
    smallest softmax that can be checked (one class always sums to 1): a softmaxed (N, 2) input is
    reported, and with C = 2 the message gives the loss floor log1p(1/e) = 0.31."""
    x = torch.randn(8, 2, generator=_g()).softmax(1)
    with pytest.warns(SafeLossWarning, match=r"(?s)looks already softmaxed.*can never go below 0\.31"):
        safeloss.cross_entropy(x, torch.randint(0, 2, (8,), generator=_g(1)), backend=backend)


# ------------------------------------------------------------- mutation pass 7 (validation area)


@pytest.mark.parametrize("shape", [(3, 4), (2, 4, 3)])
@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.int32])
@pytest.mark.parametrize("row", ["multi-hot", "empty"])
def test_integer_target_of_the_input_shape_needs_exactly_one_1_per_row(shape, dtype, row):
    """Class: target normalization (one-hot). An integer target of the input's shape is accepted
    only as a true one-hot: a row with two 1s (multi-label data) or none is an error naming the
    row, never converted into probabilities that sum to 2 or 0."""
    labels = torch.randint(0, 4, (shape[0], *shape[2:]), generator=_g(1))
    t = F.one_hot(labels, 4).movedim(-1, 1).to(dtype).contiguous()
    first_row = (0, slice(None)) + (0,) * (len(shape) - 2)  # sample 0, first position
    t[first_row] = torch.tensor([1, 1, 0, 0] if row == "multi-hot" else [0, 0, 0, 0], dtype=dtype)
    x = torch.randn(*shape, generator=_g())
    with pytest.raises(safeloss.TargetDtypeError, match=r"not one-hot: 1 row without exactly one 1 \(first at \[0,?"):
        safeloss.cross_entropy(x, t)


@pytest.mark.parametrize("shape", [(4,), (4, 3)])
@pytest.mark.parametrize("ignore_index", [-100, -1, 7])
def test_single_class_is_reported_when_the_other_labels_are_ignored(shape, ignore_index):
    """Class: findings (a mask dropped). With one output, labels that are all 0 or ignore_index
    raise no out-of-range error, so the single-class finding is the one report: ignored labels
    must not count as "labels other than 0"."""
    x = torch.randn(shape[0], 1, *shape[1:], generator=_g())
    t = torch.zeros(shape, dtype=torch.long)
    t.view(-1)[1::2] = ignore_index
    with pytest.warns(SafeLossWarning, match=r"logits with a single class"):
        got = safeloss.cross_entropy(x, t, ignore_index=ignore_index)
    torch.testing.assert_close(got, F.cross_entropy(x, t, ignore_index=ignore_index))
    with pytest.raises(safeloss.InputError, match=r"logits with a single class"):
        safeloss.cross_entropy(x, t, ignore_index=ignore_index, strict=True)


def _finding_case(kind: str) -> tuple[torch.Tensor, torch.Tensor, type[Exception]]:
    """(logits, target, strict-mode error) of a call whose finding is read from the backend's counts."""
    x = torch.randn(4, 3, generator=_g())
    t = torch.randint(0, 3, (4,), generator=_g(1))
    if kind == "softmaxed-input":
        return x.softmax(1), t, safeloss.InputError
    if kind == "bad-probabilities":
        return x, torch.rand(4, 3, generator=_g(2)) * 3, safeloss.ProbabilityTargetError
    if kind == "nonfinite":
        x[1, 2] = float("nan")
        return x, t, safeloss.NonFiniteError
    return x, torch.full((4,), -100), safeloss.EmptyBatchError  # empty-mean


@pytest.mark.parametrize("api", ["functional", "module"])
@pytest.mark.parametrize("kind", ["softmaxed-input", "bad-probabilities", "nonfinite", "empty-mean"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_strict_mode_raises_a_finding_already_shown_as_a_warning(backend, kind, api):
    """Class: strict mode raising vs warning. A warning is shown once per loss (or call site) and
    later repeats skip building their message; a strict call must still raise each time, also
    after the same finding was shown as a warning by this loss or at this line."""
    x, t, error = _finding_case(kind)
    loss = safeloss.SafeCrossEntropyLoss(backend=backend)
    seen = []
    for strict in (False, True, True):
        with warnings.catch_warnings(record=True) as w, safeloss.strict_mode(strict):
            warnings.simplefilter("always")
            try:
                loss(x, t) if api == "module" else safeloss.cross_entropy(x, t, backend=backend)
            except error:
                seen.append("raised")
            else:
                seen.append("warned" if any(issubclass(m.category, SafeLossWarning) for m in w) else "silent")
    assert seen == ["warned", "raised", "raised"], seen


def _loss_and_grad(fn, x: torch.Tensor, *args, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().clone().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SafeLossWarning)
        out = fn(x, *args, **kw)
    out.backward()
    return out.detach(), x.grad


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("ignore_index", [0, 2, 255])
@pytest.mark.parametrize("positions", [(6,), (2, 3)])
def test_mean_divides_by_the_targets_not_ignored_for_any_ignore_index(backend, weighted, ignore_index, positions):
    """Class: the reduction's divisor. The mean divides by the (weighted) count of the targets
    other than ignore_index, whatever its value: 0 and 2 are classes the ignored positions would
    otherwise count as, 255 a mask code; none may enter the divisor."""
    C = 4
    x = torch.randn(positions[0], C, *positions[1:], generator=_g())
    t = torch.randint(0, C, positions, generator=_g(1))
    t.view(-1)[::2] = ignore_index
    w = torch.rand(C, generator=_g(2)) + 0.5 if weighted else None
    got = _loss_and_grad(safeloss.cross_entropy, x, t, w, ignore_index=ignore_index, backend=backend)
    want = _loss_and_grad(F.cross_entropy, x, t, w, ignore_index=ignore_index)
    for ours, stock, what in zip(got, want, ("loss", "grad")):
        assert_matches(ours, stock, what=what)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("ignored", [False, True])
def test_mean_with_zero_total_weight_is_nan_with_stocks_gradients(backend, label_smoothing, ignored):
    """Class: the reduction's divisor (total weight 0). Every counted target has class weight 0:
    the mean is 0/0 = NaN with NaN gradients at the counted positions, as stock gives, also with
    label smoothing (whose own term alone would give finite/0 = inf)."""
    x = torch.randn(4, 3, generator=_g())
    t = torch.tensor([0, 1, 0, -100 if ignored else 1])
    w = torch.tensor([0.0, 0.0, 1.0])
    got = _loss_and_grad(safeloss.cross_entropy, x, t, w, label_smoothing=label_smoothing, backend=backend)
    want = _loss_and_grad(F.cross_entropy, x, t, w, label_smoothing=label_smoothing)
    assert want[0].isnan()
    for ours, stock, what in zip(got, want, ("loss", "grad")):
        assert_matches(ours, stock, what=what)


def _safeloss_warnings(call) -> list[str]:
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        call()
    return [str(m.message) for m in w if issubclass(m.category, SafeLossWarning)]


KINDS = ["softmaxed-input", "bad-probabilities", "nonfinite", "empty-mean"]


@pytest.mark.parametrize("first, second", [(a, b) for a in KINDS for b in KINDS if a != b])
def test_a_loss_warns_once_per_kind_of_finding(first, second):
    """Class: once-per-loss warning semantics. "Once" is per kind of finding and per loss: a
    repeat of the same kind is silent, a different kind is shown, and another loss instance
    shows its own."""
    loss, other = safeloss.SafeCrossEntropyLoss(), safeloss.SafeCrossEntropyLoss()
    a, b = _finding_case(first)[:2], _finding_case(second)[:2]
    counts = [len(_safeloss_warnings(lambda: loss(*a))), len(_safeloss_warnings(lambda: loss(*a))),
              len(_safeloss_warnings(lambda: loss(*b))), len(_safeloss_warnings(lambda: loss(*b))),
              len(_safeloss_warnings(lambda: other(*a)))]
    assert counts == [1, 0, 1, 0, 1], counts


@pytest.mark.parametrize("kind", KINDS)
def test_the_functional_api_warns_once_per_call_site(kind):
    """Class: once-per-loss warning semantics, functional API: once per call site (file and
    line), so a loop warns once, and a second line of the same file warns on its own."""
    x, t, _ = _finding_case(kind)
    loop = [len(_safeloss_warnings(lambda: safeloss.cross_entropy(x, t))) for _ in range(3)]
    other_line = len(_safeloss_warnings(lambda: safeloss.cross_entropy(x, t)))
    assert loop + [other_line] == [1, 0, 0, 1], loop + [other_line]
