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

import pytest
import torch
import torch.nn.functional as F

import safeloss
from safeloss import SafeLossWarning
from safeloss.backends import dispatch
from safeloss.core import config
from tests.test_differential import CPU_BACKENDS

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

_STRIDE = re.compile(r"^[a-z]s[012c]$")  # the kernels' stride arguments: xs0, ts1, dsc, ...


def _int64_violations(src: str) -> tuple[list[str], int]:
    """Products of a stride argument with an index that is not int64 by construction, in the
    ``@triton.jit`` functions of ``src``. An index is int64 when every assignment of it casts to
    ``tl.int64`` or is built from int64 names (propagated through the helpers' returned tuples).
    Triton passes a stride below 2**31 as int32: int32 index * int32 stride overflows past 2**31
    elements, which LM heads (N * V) exceed routinely."""
    tree = ast.parse(src)
    funcs = {f.name: f for f in tree.body if isinstance(f, ast.FunctionDef)
             and any("jit" in ast.unparse(d) for d in f.decorator_list)}
    int64: dict[str, set[str]] = {name: set() for name in funcs}
    returns: dict[str, set[int]] = {name: set() for name in funcs}
    assigns: dict[str, dict[str, list]] = {name: {} for name in funcs}
    for fname, f in funcs.items():
        for node in ast.walk(f):
            if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
                for tgt in node.targets if isinstance(node, ast.Assign) else [node.target]:
                    elts = [(tgt, None)] if isinstance(tgt, ast.Name) else list(
                        (e, i) for i, e in enumerate(getattr(tgt, "elts", [])))
                    for el, pos in elts:
                        if isinstance(el, ast.Name):
                            assigns[fname].setdefault(el.id, []).append((node.value, pos))
            elif isinstance(node, ast.For) and isinstance(node.target, ast.Name):
                assigns[fname].setdefault(node.target.id, []).append((None, None))

    def i64(fname: str, node: ast.AST | None, pos: int | None = None) -> bool:
        if node is None:
            return False
        if pos is not None:
            return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                and pos in returns.get(node.func.id, set())
        return any((isinstance(s, ast.Attribute) and s.attr == "int64")
                   or (isinstance(s, ast.Name) and s.id in int64[fname]) for s in ast.walk(node))

    changed = True
    while changed:
        changed = False
        for fname, f in funcs.items():
            for name, values in assigns[fname].items():
                if name not in int64[fname] and all(i64(fname, v, p) for v, p in values):
                    int64[fname].add(name)
                    changed = True
            for node in ast.walk(f):
                if isinstance(node, ast.Return) and isinstance(node.value, ast.Tuple):
                    for i, el in enumerate(node.value.elts):
                        if i not in returns[fname] and i64(fname, el):
                            returns[fname].add(i)
                            changed = True
    bad, products = [], 0
    for fname, f in funcs.items():
        for node in ast.walk(f):
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
                for a, b in ((node.left, node.right), (node.right, node.left)):
                    if isinstance(a, ast.Name) and _STRIDE.match(a.id):
                        products += 1
                        if not i64(fname, b):
                            bad.append(f"{fname}:{node.lineno}: {ast.unparse(node)}")
    return bad, products


def test_kernel_offsets_are_int64_by_construction():
    src = (ROOT / "safeloss" / "backends" / "triton_kernels.py").read_text()
    bad, products = _int64_violations(src)
    assert products >= 40, "the kernels' stride arguments were renamed: update _STRIDE"
    assert not bad, "int32 index * stride (overflows past 2**31 elements):\n" + "\n".join(bad)


def test_the_int64_check_catches_a_dropped_cast():
    src = (ROOT / "safeloss" / "backends" / "triton_kernels.py").read_text()
    for old in ("o64 = o.to(tl.int64)", "cols64 = cols.to(tl.int64)", ".to(tl.int64)[None, :] * dsc"):
        assert old in src
        mutant = src.replace(old, old.replace(".to(tl.int64)", ""), 1)
        assert _int64_violations(mutant)[0], old


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
    with pytest.raises(safeloss.TargetDtypeError, match=r"not whole class numbers: 1 value with a fraction or NaN/inf: \S+ at \(2,\)"):
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
