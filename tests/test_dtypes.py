"""Every dtype mix: logits x target x class weight, index and probability targets, with and
without torch.autocast, judged against stock torch itself.

* stock accepts the mix: safeloss gives stock's dtype and value, and stock's gradients, in strict
  mode without a word;
* stock rejects it: safeloss either raises a SafeLossError that is also stock's builtin exception
  class, or applies one of the listed conversions (CONVERSIONS below, documented in README.md's
  table): a warning in default mode and the value stock gives for the converted inputs, an error
  of that builtin class in strict mode. Class-index labels in a lossless integer dtype stock does
  not take (LOSSLESS_LABELS) are accepted silently in both modes, as README.md documents.

The torch backend runs the whole grid; the Triton kernel (through its interpreter on CPU, so a
share kept small) runs every logits x weight mix for int64 labels and each float probability
target dtype.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import safeloss
from safeloss import SafeLossError, SafeLossWarning
from safeloss.backends import dispatch
from tests.test_differential import CPU_BACKENDS
from tests.tolerances import assert_matches, least_precise

FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
INTS = [torch.int8, torch.int16, torch.int32, torch.int64,
        torch.uint8, torch.uint16, torch.uint32, torch.uint64, torch.bool]
WEIGHTS = [None, *FLOATS]
# Labels stock torch rejects only for their dtype ("expected target dtype to be Long or Byte");
# every value converts to int64 exactly, so safeloss takes them as they are.
LOSSLESS_LABELS = {torch.int8, torch.int16, torch.int32, torch.uint16, torch.uint32, torch.uint64}
# Index-shaped (class labels) and input-shaped (probabilities / one-hot) targets.
TARGETS = [("index", d) for d in INTS + FLOATS] + [("prob", d) for d in FLOATS] + [
    ("prob", d) for d in (torch.int64, torch.uint8, torch.uint16, torch.bool)
]


def _name(d: torch.dtype | None) -> str:
    return "none" if d is None else str(d).removeprefix("torch.")


def _stock_dtype(d: torch.dtype, autocast: bool) -> torch.dtype:
    """The dtype stock torch computes a float tensor in: cross_entropy is an autocast float32 op,
    which casts every floating tensor but float64 (torch's autocast rules)."""
    return torch.float32 if autocast and d != torch.float64 else d


@dataclass
class Conversion:
    name: str
    warning: str  # regex of the default-mode warning
    error: type[SafeLossError]  # strict mode


CONVERSIONS = {
    "float-labels": Conversion("float-labels", r"class-index targets stored as torch\.\w+", safeloss.TargetDtypeError),
    "integer-onehot": Conversion("integer-onehot", r"one-hot targets as torch\.\w+", safeloss.TargetDtypeError),
    "weight-dtype": Conversion(
        "weight-dtype", r"weight is torch\.\w+ but the logits are torch\.\w+.*casts the weight", safeloss.WeightError
    ),
}


def _inputs(xd, kind, td, wd):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 3, generator=g, dtype=torch.float64) * 2).to(xd)
    labels = torch.tensor([0, 2, 1, 1])
    if kind == "index":
        t = labels.to(td)
    elif td.is_floating_point:
        t = torch.rand(4, 3, generator=g, dtype=torch.float64).softmax(1).to(td)
    else:
        t = torch.eye(3, dtype=torch.int64)[labels].to(td)  # one-hot
    w = None if wd is None else (torch.rand(3, generator=g, dtype=torch.float64) + 0.5).to(wd)
    return x, t, w


def _plan(kind, td, wd, xd, autocast):
    """What the listed rules do with this mix: (conversions in report order, converted target
    and weight makers), or None where safeloss must raise (no conversion of it exists)."""
    conv = []
    tconv = wconv = None
    prob = kind == "prob"
    if not prob:
        if td == torch.bool:
            return None
        if td.is_floating_point:
            conv.append(CONVERSIONS["float-labels"])
        if td not in (torch.int64, torch.uint8):
            tconv = lambda t: t.long()  # noqa: E731
        cdt = _stock_dtype(xd, autocast)
        if wd is not None and _stock_dtype(wd, autocast) != cdt:
            conv.append(CONVERSIONS["weight-dtype"])
            wconv = lambda w: w.to(cdt)  # noqa: E731
    elif not td.is_floating_point:
        conv.append(CONVERSIONS["integer-onehot"])
        tconv = lambda t: t.to(xd)  # noqa: E731
    return conv, tconv, wconv


def _call(fn, x, t, w, reduction, g=None, tgrad=True):
    """(output, grad of x, grad of t or None) of one fn call on fresh leaves."""
    x = x.detach().requires_grad_()
    t = t.detach()
    if t.is_floating_point() and t.shape == x.shape and tgrad:
        t.requires_grad_()
    out = fn(x, t, w, reduction=reduction)
    if g is None:
        return out, None, None
    out.backward(g.to(out.dtype))
    return out.detach(), x.grad, t.grad if t.requires_grad else None


def _check(backend, xd, kind, td, wd, autocast):
    x, t, w = _inputs(xd, kind, td, wd)
    g = torch.rand(4, generator=torch.Generator().manual_seed(3)) + 0.5  # non-trivial upstream
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if autocast else contextlib.nullcontext

    def ours(strict):
        return lambda x, t, w, reduction: safeloss.cross_entropy(
            x, t, w, reduction=reduction, backend=backend, strict=strict
        )

    stock_err = None
    try:
        with ctx():
            F.cross_entropy(x, t, w)
    except Exception as e:  # whatever stock raises is the reference
        stock_err = e
    plan = _plan(kind, td, wd, xd, autocast)
    if stock_err is not None and plan is None:
        for strict in (False, True):
            with pytest.raises(SafeLossError) as e, ctx():
                ours(strict)(x, t, w, "mean")
            assert isinstance(e.value, type(stock_err)), (type(e.value).__mro__, type(stock_err))
        return
    assert plan is not None
    conv, tconv, wconv = plan
    if stock_err is None:
        assert not conv and tconv is None, "stock accepts this mix: nothing may be converted"
    else:
        assert conv or td in LOSSLESS_LABELS, f"stock rejects this mix ({stock_err}), and no rule covers it"
    t2 = t if tconv is None else tconv(t)
    w2 = w if wconv is None else wconv(w)

    tgrad = t.is_floating_point()  # a converted one-hot target has no gradient
    with ctx():
        ref = [_call(F.cross_entropy, x, t2, w2, "none", g, tgrad), _call(F.cross_entropy, x, t2, w2, "mean")]
    with torch.autocast("cpu", enabled=False):
        tt = t2.double() if t2.is_floating_point() else t2
        truth = [_call(F.cross_entropy, x.double(), tt, None if w2 is None else w2.double(), "none", g, tgrad),
                 _call(F.cross_entropy, x.double(), tt, None if w2 is None else w2.double(), "mean")]
    prob = kind == "prob"
    prec = least_precise(
        _stock_dtype(xd, autocast),
        _stock_dtype(t2.dtype, autocast) if prob else None,
        _stock_dtype(w2.dtype, autocast) if prob and w2 is not None else None,
    )

    with warnings.catch_warnings(record=True) as caught, ctx():
        warnings.simplefilter("always")
        safeloss.reset_warnings()
        got = [_call(ours(False), x, t, w, "none", g), _call(ours(False), x, t, w, "mean")]
    messages = [str(c.message) for c in caught if issubclass(c.category, SafeLossWarning)]
    assert len(messages) == len(conv), messages  # one per conversion: the calls share a call site
    for c in conv:
        assert any(re.search(c.warning, m, re.S) for m in messages), (c.name, messages)

    for (o, ogx, ogt), (s, sgx, sgt), (tr, tgx, tgt), what in zip(got, ref, truth, ("none", "mean")):
        assert_matches(o, s, tr, f"{what} value", precision=prec)
        if ogx is not None:
            assert_matches(ogx, sgx, tgx, f"{what} d/dx", precision=prec)
        if sgt is not None:
            assert ogt is not None, "no gradient for the probability targets"
            assert_matches(ogt, sgt, tgt, f"{what} d/dtarget", precision=prec)

    if conv:
        with pytest.raises(conv[0].error, match=conv[0].warning) as e, ctx():
            ours(True)(x, t, w, "mean")
        assert isinstance(e.value, type(stock_err))
    else:  # stock accepts it, or a lossless label dtype: strict mode has nothing to say
        with warnings.catch_warnings(), ctx():
            warnings.simplefilter("error")
            ours(True)(x, t, w, "mean")


def _id(xd, kind, td, wd):
    return f"x-{_name(xd)}-{kind}-{_name(td)}-w-{_name(wd)}"


GRID = [pytest.param(xd, kind, td, wd, id=_id(xd, kind, td, wd))
        for xd in FLOATS for kind, td in TARGETS for wd in WEIGHTS]


@pytest.mark.parametrize("autocast", [False, True], ids=["eager", "autocast"])
@pytest.mark.parametrize("xd,kind,td,wd", GRID)
def test_dtype_grid_torch(xd, kind, td, wd, autocast):
    _check("torch", xd, kind, td, wd, autocast)


# The kernel's share: what it computes differently from stock (fp32 math, promotion of the
# result) shows with int64 labels and each probability dtype; float64 logits never reach it.
TRITON_GRID = [pytest.param(xd, kind, td, wd, ac, id=_id(xd, kind, td, wd) + ("-autocast" if ac else ""))
               for xd in FLOATS[:3] for ac in ((False, True) if xd == torch.bfloat16 else (False,))
               for kind, td in [("index", torch.int64)] + [("prob", d) for d in FLOATS]
               for wd in WEIGHTS]
_triton_reason = dispatch.triton_unavailable_reason(torch.device("cpu"))


@pytest.mark.skipif(_triton_reason is not None, reason=str(_triton_reason))
@pytest.mark.parametrize("xd,kind,td,wd,autocast", TRITON_GRID)
def test_dtype_grid_triton(xd, kind, td, wd, autocast):
    _check("triton", xd, kind, td, wd, autocast)


# ---------------------------------------------------------------------------- unsigned labels


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.uint16, torch.uint32, torch.uint64])
def test_unsigned_bad_label_is_named(dtype, backend):
    """A bad label in an unsigned dtype gets the out-of-range message, not a bare kernel error."""
    t = torch.tensor([0, 1, 7, 2]).to(dtype)
    with pytest.raises(safeloss.TargetOutOfRangeError, match=r"(?s)1 of 4 targets is outside the class range 0..4.*bad values: 7 at \[2\]") as e:
        safeloss.cross_entropy(torch.randn(4, 5), t, backend=backend)
    assert isinstance(e.value, IndexError)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("value", [2**64 - 1, 2**63])
def test_uint64_label_never_wraps(value, backend):
    """2**64 - 1 is -1 stored as uint64: never read as -1, so never skipped by ignore_index=-1."""
    t = torch.tensor([0, 1, value, 2], dtype=torch.uint64)
    neg = value - 2**64
    pattern = (
        rf"(?s)1 of 4 targets is outside the class range 0..4 \(5 classes\): uint64 labels of 2\*\*63 or more"
        rf".*bad values: {value} at \[2\].*dtype torch.uint64, ignore_index=-1"
        rf".*what the label {neg} becomes when it is stored as uint64.*target.to\(torch.int64\)"
    )
    for strict in (False, True):
        with pytest.raises(safeloss.TargetOutOfRangeError, match=pattern):
            safeloss.cross_entropy(torch.randn(4, 5), t, ignore_index=-1, backend=backend, strict=strict)
    if value == 2**64 - 1:
        with pytest.raises(safeloss.TargetOutOfRangeError, match=r"which ignore_index=-1 then skips"):
            safeloss.cross_entropy(torch.randn(4, 5), t, ignore_index=-1, backend=backend)


def test_uint64_onehot_with_huge_entries_is_not_onehot():
    t = torch.tensor([[1, 0], [0, 2**64 - 1]], dtype=torch.uint64)
    with pytest.raises(safeloss.TargetDtypeError, match=r"not one-hot: 1 entry other than 0/1"):
        safeloss.cross_entropy(torch.randn(2, 2), t)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint16])
def test_ignore_index_beyond_the_label_dtype_never_wraps(dtype, backend):
    """2**40 as int32 is 0: a comparison in the label dtype would skip every class-0 label."""
    x, t = torch.randn(4, 5), torch.tensor([0, 1, 0, 3])
    for red in ("mean", "sum", "none"):
        out = safeloss.cross_entropy(x, t.to(dtype), ignore_index=2**40, reduction=red, backend=backend)
        assert_matches(out, F.cross_entropy(x, t, ignore_index=2**40, reduction=red))


def test_uint64_label_never_wraps_in_compiled_code():
    """Traced code cannot read the labels: a huge uint64 label is still bad, never ignore_index."""
    f = torch.compile(lambda x, t: safeloss.cross_entropy(x, t, ignore_index=-1), fullgraph=True, backend="eager")
    x = torch.randn(4, 5)
    t = torch.tensor([0, 1, 2, 3], dtype=torch.uint64)
    assert_matches(f(x, t), F.cross_entropy(x, t.long(), ignore_index=-1))
    t = torch.tensor([0, 1, 2**64 - 1, 3], dtype=torch.uint64)
    with pytest.raises(safeloss.TargetOutOfRangeError, match=r"(?s)1 of 4 targets is outside.*stands for uint64 labels of 2\*\*63 or more.*target.to\(torch.int64\)") as e:
        f(x, t)
    assert "ignore_index=-9223372036854775808" not in str(e.value)


def test_weight_dtype_rule_on_meta_logits():
    """The vocab-parallel path checks the weight against meta logits of the gathered shape:
    autocast has no state for the meta device, which must read as "off", not fail."""
    from safeloss.core import validation

    meta = torch.empty(4, 5, device="meta")
    w, findings = validation._check_weight(torch.ones(5, dtype=torch.float64), meta, 5, True, torch.float32)
    assert w.dtype == torch.float32 and [f.kind for f in findings] == ["weight-dtype"]
    assert findings[0].message.startswith("weight is torch.float64 but the logits are torch.float32;")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype,value", [(torch.uint32, 2**32 - 1), (torch.uint32, 2**31), (torch.uint16, 2**16 - 1)])
def test_wide_unsigned_label_keeps_its_value(dtype, value, backend):
    """uint16 / uint32 labels widen without wrapping (issue 19's mutant: uint32 widened to int32
    turned 2**32 - 1 into -1, which ignore_index=-1 then skipped silently): the label is named with
    its own value and never equals a negative ignore_index."""
    t = torch.tensor([0, 1, value, 2]).to(dtype)
    x = torch.randn(4, 5)
    for ignore_index in (-1, -100):
        for strict in (False, True):
            with pytest.raises(safeloss.TargetOutOfRangeError,
                               match=rf"(?s)1 of 4 targets is outside the class range 0..4.*bad values: {value} at \[2\]"
                                     rf".*ignore_index={ignore_index}"):
                safeloss.cross_entropy(x, t, ignore_index=ignore_index, backend=backend, strict=strict)
    # in range, the widened labels are the same classes as int64 ones
    t = torch.tensor([0, 1, 4, 2]).to(dtype)
    assert_matches(safeloss.cross_entropy(x, t, ignore_index=-1, backend=backend), F.cross_entropy(x, t.long()))
