"""Error classes, swept: for every input stock torch rejects, safeloss raises a ``SafeLossError``
that is also an instance of the builtin stock raised for *that* input; for every input stock
accepts, safeloss returns the same value. The exceptions to both rules are the two lists below,
which docs/migration.md ("Error classes") documents:

* ``CONVERSIONS``: inputs stock rejects whose meaning is clear. safeloss must give exactly stock's
  result on the converted input; if the converted input is still invalid, the error is the
  converted input's (an out-of-range int32 label is an ``IndexError``, as for int64 labels).
* ``REJECTED``: inputs stock accepts that are bugs safeloss refuses, each with its reason.

The grid covers 1-d..4-d logits; targets with the expected shape, off-by-one batch and spatial
sizes, extra and missing dims, ``(N, 1)``, 0-d and flat; probability targets of mismatched
shapes; every target dtype family; weights of the wrong length, rank and dtype; ``ignore_index``
with probability targets; bad ``reduction`` / ``label_smoothing`` / ``ignore_index`` values and
non-tensor arguments. It runs for ``safeloss.cross_entropy`` (default and strict mode) and for
``SafeCrossEntropyLoss``, plus torch's own ``module_error_inputs`` for ``nn.CrossEntropyLoss``
and ``nn.LinearCrossEntropyLoss``.
"""

from __future__ import annotations

import math
import pickle
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import safeloss
from safeloss import SafeLossError
from tests.tolerances import TIGHT

Args = tuple[Any, Any, dict[str, Any]]  # (input, target, keyword arguments)

# The sweep calls stock torch with reduction="elementwise_mean", which stock itself warns about.
pytestmark = pytest.mark.filterwarnings("ignore:reduction='elementwise_mean' is deprecated:UserWarning")


@dataclass(frozen=True)
class Case:
    id: str
    make: Callable[[], Args]


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _logits(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=_g(seed), dtype=torch.float64).float()


def _labels(C: int, shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    t = torch.randint(0, max(C, 1), shape, generator=_g(seed + 1))
    return t.to(dtype)


def _probs(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    if not shape:
        return torch.tensor(1.0, dtype=dtype)
    cdim = 0 if len(shape) == 1 else 1
    return torch.randn(shape, generator=_g(seed + 2), dtype=torch.float64).softmax(cdim).to(dtype)


INPUTS = {"1d": (5,), "2d": (4, 5), "3d": (4, 5, 3), "4d": (2, 5, 3, 2)}
INDEX_DTYPES = [torch.int64, torch.int32, torch.uint8, torch.float32, torch.bool, torch.complex64]
PROB_DTYPES = [torch.float32, torch.float64, torch.float16, torch.int64]


def _target_shapes(ish: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    exp = ish[1:] if len(ish) == 1 else ish[:1] + ish[2:]
    shapes = {"expected": exp, "0-d": (), "(1,)": (1,), "(2,)": (2,), "(0,)": (0,),
              "flat": (math.prod(exp),), "extra-last": exp + (1,), "(1, 1)": (1, 1)}
    if exp:
        shapes |= {
            "batch+1": (exp[0] + 1,) + exp[1:], "batch-1": (exp[0] - 1,) + exp[1:],
            "singleton-dim1": exp[:1] + (1,) + exp[1:], "missing-last": exp[:-1],
            "transposed": exp[::-1], "empty-batch": (0,) + exp[1:],
        }
        if len(exp) > 1:
            shapes |= {"spatial+1": exp[:-1] + (exp[-1] + 1,), "spatial-1": exp[:-1] + (exp[-1] - 1,)}
    return shapes


def _grid() -> list[Case]:
    cases: list[Case] = []

    def add(id_: str, make: Callable[[], Args]) -> None:
        cases.append(Case(id_, make))

    seed = 0
    for iname, ish in INPUTS.items():
        C = ish[0] if len(ish) == 1 else ish[1]
        exp = ish[1:] if len(ish) == 1 else ish[:1] + ish[2:]
        seed += 10
        # Class-index targets: every shape x every dtype.
        for tname, tsh in _target_shapes(ish).items():
            for dt in INDEX_DTYPES:
                add(f"{iname}-index-{tname}-{dt}".replace("torch.", ""),
                    lambda ish=ish, C=C, tsh=tsh, dt=dt, s=seed: (_logits(ish, s), _labels(C, tsh, dt, s), {}))
        # Out-of-range, negative and ignored labels, in two dtypes.
        for dt in (torch.int64, torch.int32):
            for what, fill in [("C", C), ("-1", -1), ("-100", -100)]:
                def make(ish=ish, C=C, exp=exp, dt=dt, fill=fill, s=seed) -> Args:
                    t = _labels(C, exp, torch.int64, s)
                    t.view(-1)[0] = fill
                    return _logits(ish, s), t.to(dt), {}
                add(f"{iname}-label-{what}-{dt}".replace("torch.", ""), make)
            add(f"{iname}-ignore_index=C-{dt}".replace("torch.", ""),
                lambda ish=ish, C=C, exp=exp, dt=dt, s=seed: (
                    _logits(ish, s), torch.full(exp, C, dtype=dt), {"ignore_index": C}))
        # Float labels: whole numbers (converted), fractions, NaN and inf (rejected).
        for what, fill in [("fraction", 0.5), ("nan", math.nan), ("inf", math.inf), ("-inf", -math.inf)]:
            def make(ish=ish, C=C, exp=exp, fill=fill, s=seed) -> Args:
                t = _labels(C, exp, torch.float32, s)
                t.view(-1)[0] = fill
                return _logits(ish, s), t, {}
            add(f"{iname}-float-label-{what}", make)
        # Probability targets: matching and mismatched shapes, every dtype, with ignore_index.
        pshapes = {"same": ish}
        if len(ish) >= 2:
            pshapes |= {"batch+1": (ish[0] + 1,) + ish[1:], "C+1": ish[:1] + (ish[1] + 1,) + ish[2:],
                        "C-1": ish[:1] + (ish[1] - 1,) + ish[2:]}
        if len(ish) >= 3:
            pshapes["spatial+1"] = ish[:-1] + (ish[-1] + 1,)
        for pname, psh in pshapes.items():
            for dt in PROB_DTYPES:
                add(f"{iname}-prob-{pname}-{dt}".replace("torch.", ""),
                    lambda ish=ish, psh=psh, dt=dt, s=seed: (_logits(ish, s), _probs(psh, dt, s), {}))
            for ii in (0, 3, -1):
                add(f"{iname}-prob-{pname}-ignore_index={ii}",
                    lambda ish=ish, psh=psh, ii=ii, s=seed: (
                        _logits(ish, s), _probs(psh, torch.float32, s), {"ignore_index": ii}))
        # Integer one-hot targets of the input's shape.
        if len(ish) >= 2:
            def onehot(ish=ish, C=C, exp=exp, s=seed, dt=torch.int64, bad=False) -> Args:
                t = F.one_hot(_labels(C, exp, torch.int64, s), C).movedim(-1, 1).contiguous().to(dt)
                if bad:
                    t.view(-1)[0] = 2
                return _logits(ish, s), t, {}
            add(f"{iname}-onehot-int64", onehot)
            add(f"{iname}-onehot-bool", lambda f=onehot: f(dt=torch.bool))
            add(f"{iname}-onehot-not-one-hot", lambda f=onehot: f(bad=True))
        # Class weights: wrong length, rank, dtype, type; with index and probability targets.
        weights: dict[str, Callable[[], Any]] = {
            "len-1": lambda C=C: torch.ones(C - 1), "len+1": lambda C=C: torch.ones(C + 1),
            "(1,C)": lambda C=C: torch.rand(1, C, generator=_g(3)) + 0.5,
            "(C,1)": lambda C=C: torch.rand(C, 1, generator=_g(3)) + 0.5,
            "(C,C)": lambda C=C: torch.ones(C, C), "0-d": lambda: torch.tensor(1.0),
            "int64": lambda C=C: torch.ones(C, dtype=torch.int64),
            "float64": lambda C=C: torch.rand(C, generator=_g(3), dtype=torch.float64) + 0.5,
            "float16": lambda C=C: (torch.rand(C, generator=_g(3)) + 0.5).half(),
            "list": lambda C=C: [1.0] * C,
            "requires-grad": lambda C=C: torch.ones(C, requires_grad=True),
        }
        for wname, w in weights.items():
            add(f"{iname}-weight-{wname}",
                lambda ish=ish, C=C, exp=exp, w=w, s=seed: (
                    _logits(ish, s), _labels(C, exp, torch.int64, s), {"weight": w()}))
            if wname in ("len+1", "(1,C)", "int64", "float16"):
                add(f"{iname}-prob-weight-{wname}",
                    lambda ish=ish, w=w, s=seed: (_logits(ish, s), _probs(ish, torch.float32, s), {"weight": w()}))
        # Arguments of the wrong value or type.
        for name, kw in [
            ("reduction-avg", {"reduction": "avg"}), ("reduction-Mean", {"reduction": "Mean"}),
            ("reduction-None", {"reduction": None}), ("reduction-1", {"reduction": 1}),
            ("reduction-elementwise_mean", {"reduction": "elementwise_mean"}),
            ("label_smoothing-1.5", {"label_smoothing": 1.5}), ("label_smoothing-1", {"label_smoothing": 1}),
            ("label_smoothing--0.1", {"label_smoothing": -0.1}), ("label_smoothing-nan", {"label_smoothing": math.nan}),
            ("label_smoothing-str", {"label_smoothing": "0.1"}), ("label_smoothing-None", {"label_smoothing": None}),
            ("label_smoothing-True", {"label_smoothing": True}),
            ("label_smoothing-tensor", {"label_smoothing": torch.tensor(0.1)}),
            ("ignore_index-1.5", {"ignore_index": 1.5}), ("ignore_index-str", {"ignore_index": "a"}),
            ("ignore_index-None", {"ignore_index": None}), ("ignore_index-True", {"ignore_index": True}),
            ("ignore_index-tensor", {"ignore_index": torch.tensor(1)}),
        ]:
            add(f"{iname}-{name}", lambda ish=ish, C=C, exp=exp, kw=kw, s=seed: (
                _logits(ish, s), _labels(C, exp, torch.int64, s), dict(kw)))
            if name.startswith("label_smoothing"):
                add(f"{iname}-prob-{name}", lambda ish=ish, kw=kw, s=seed: (
                    _logits(ish, s), _probs(ish, torch.float32, s), dict(kw)))
        # Label smoothing combined with a bad target: stock checks the smoothing first.
        add(f"{iname}-label_smoothing-1.5-batch+1", lambda ish=ish, C=C, exp=exp, s=seed: (
            _logits(ish, s), _labels(C, ((exp[0] + 1,) + exp[1:]) if exp else (2,), torch.int64, s),
            {"label_smoothing": 1.5}))
        add(f"{iname}-label_smoothing-0.1-batch+1", lambda ish=ish, C=C, exp=exp, s=seed: (
            _logits(ish, s), _labels(C, ((exp[0] + 1,) + exp[1:]) if exp else (2,), torch.int64, s),
            {"label_smoothing": 0.1}))
        # Logits of the wrong dtype.
        for dt in (torch.int64, torch.int32, torch.bool, torch.complex64):
            add(f"{iname}-input-{dt}".replace("torch.", ""), lambda ish=ish, C=C, exp=exp, dt=dt, s=seed: (
                (_logits(ish, s) * 3).to(dt), _labels(C, exp, torch.int64, s), {}))
    # 0-d logits, non-tensor arguments, empty batches, a single class.
    for tname, t in [("0-d-float", lambda: torch.tensor(1.0)), ("0-d-long", lambda: torch.tensor(0)),
                     ("(1,)", lambda: torch.tensor([0])), ("(1,)-float", lambda: torch.tensor([1.0]))]:
        add(f"0-d-input-{tname}", lambda t=t: (torch.tensor(0.5), t(), {}))
    add("0-d-int-input", lambda: (torch.tensor(1), torch.tensor([0]), {}))
    add("input-list", lambda: ([[1.0, 2.0]], torch.tensor([0]), {}))
    add("target-list", lambda: (_logits((2, 3), 0), [0, 1], {}))
    add("int-input-target-list", lambda: (torch.ones(2, 3, dtype=torch.long), [0, 1], {}))
    add("target-None", lambda: (_logits((2, 3), 0), None, {}))
    add("empty-batch", lambda: (_logits((0, 5), 0), torch.zeros(0, dtype=torch.long), {"reduction": "sum"}))
    add("empty-batch-0-d-target", lambda: (_logits((0, 5), 0), torch.tensor(0), {}))
    add("empty-batch-3d-0-d-target", lambda: (_logits((0, 5, 3), 0), torch.tensor(0), {}))
    add("empty-prob", lambda: (_logits((0, 5), 0), torch.zeros(0, 5), {"reduction": "sum"}))
    add("single-class-(N,1)-int", lambda: (_logits((4, 1), 0), torch.zeros(4, 1, dtype=torch.long), {}))
    add("single-class-1d-int", lambda: (_logits((1,), 0), torch.zeros(1, dtype=torch.long), {}))
    return cases


CASES = _grid()


# ------------------------------------------------------------------------------------- the lists


def _index_shaped(x: torch.Tensor, t: torch.Tensor) -> bool:
    return x.dim() >= 1 and t.shape != x.shape


def _conv_index_dtype(x: Any, t: Any, kw: dict) -> Args | None:
    """int32 / int16 / int8 labels, and uint8 labels for K-d logits (stock: int64 or uint8 for
    2-D only): lossless, used as int64."""
    if isinstance(t, torch.Tensor) and isinstance(x, torch.Tensor) and _index_shaped(x, t) \
            and not t.is_floating_point() and not t.is_complex() and t.dtype not in (torch.int64, torch.bool):
        return x, t.long(), kw
    return None


def _conv_float_labels(x: Any, t: Any, kw: dict) -> Args | None:
    """Float labels holding whole numbers: used as class indices (warning; strict: error)."""
    if isinstance(t, torch.Tensor) and isinstance(x, torch.Tensor) and _index_shaped(x, t) \
            and t.is_floating_point() and bool((torch.isfinite(t) & (t == t.round())).all()):
        return x, t.long(), kw
    return None


def _conv_squeeze(x: Any, t: Any, kw: dict) -> Args | None:
    """``(N, 1, d1..)`` labels for ``(N, C, d1..)`` logits: squeezed (warning; strict: error)."""
    if isinstance(t, torch.Tensor) and isinstance(x, torch.Tensor) and x.dim() >= 2 and t.dim() == x.dim() \
            and t.shape[1] == 1 and t.shape[:1] + t.shape[2:] == x.shape[:1] + x.shape[2:] \
            and not t.is_floating_point() and (t.shape != x.shape or x.shape[1] == 1):
        return x, t.squeeze(1), kw
    return None


def _conv_onehot(x: Any, t: Any, kw: dict) -> Args | None:
    """Integer or bool one-hot targets of the input's shape: used as probabilities (warning)."""
    if isinstance(t, torch.Tensor) and isinstance(x, torch.Tensor) and t.shape == x.shape \
            and not t.is_floating_point() and not t.is_complex() and x.dim() >= 1 and x.shape[_cdim(x)] > 1:
        return x, t.to(x.dtype), kw
    return None


def _conv_weight(x: Any, t: Any, kw: dict) -> Args | None:
    """A float ``weight`` of another dtype (cast), or of shape (1, C) / (C, 1) (flattened)."""
    w = kw.get("weight")
    if not (isinstance(w, torch.Tensor) and isinstance(x, torch.Tensor) and w.is_floating_point()):
        return None
    C = x.shape[_cdim(x)] if x.dim() else 0
    new = w
    if w.dim() != 1 and w.numel() == C and max(w.shape, default=1) == C:
        new = new.reshape(C)
    if new.dtype != x.dtype and not (isinstance(t, torch.Tensor) and t.shape == x.shape):
        new = new.to(x.dtype)
    return (x, t, {**kw, "weight": new}) if new is not w else None


CONVERSIONS: list[Callable[[Any, Any, dict], Args | None]] = [
    _conv_index_dtype, _conv_float_labels, _conv_squeeze, _conv_onehot, _conv_weight,
]
# Conversions that do not warn, so strict mode applies them too.
SILENT = {_conv_index_dtype, _conv_weight}


def _cdim(x: torch.Tensor) -> int:
    return 0 if x.dim() == 1 else 1


# Inputs stock accepts that safeloss rejects on purpose: (name, applies, safeloss class, reason).
REJECTED: list[tuple[str, Callable[[Any, Any, dict], bool], type[SafeLossError], str]] = [
    ("label_smoothing < 0 or NaN",
     lambda x, t, kw: isinstance(kw.get("label_smoothing"), float)
     and not 0 <= kw["label_smoothing"] <= 1,
     safeloss.LabelSmoothingError,
     "stock silently treats it as 0.0 (NaN: as no smoothing), so the smoothing asked for never happens"),
    ("integer weight with probability targets",
     lambda x, t, kw: isinstance(kw.get("weight"), torch.Tensor) and not kw["weight"].is_floating_point()
     and isinstance(t, torch.Tensor) and isinstance(x, torch.Tensor) and t.shape == x.shape,
     safeloss.WeightError,
     "stock rejects an integer weight with class-index targets; safeloss asks for a float weight "
     "for both kinds of target (weight.float()), so switching target kinds cannot break it"),
    ("label_smoothing=True",
     lambda x, t, kw: kw.get("label_smoothing") is True,
     safeloss.ArgumentTypeError,
     "stock reads True as 1.0, a uniform target that learns nothing; a flag was meant"),
]


def _convert(x: Any, t: Any, kw: dict, allowed: Any = None) -> tuple[Args, list[str]]:
    names = []
    for conv in CONVERSIONS:
        if allowed is not None and conv not in allowed:
            continue
        out = conv(x, t, kw)
        if out is not None:
            (x, t, kw), names = out, names + [conv.__name__]
    return (x, t, kw), names


# ------------------------------------------------------------------------------------- the sweep


def _run(fn: Callable[[], Any]) -> tuple[bool, Any]:
    try:
        return True, fn()
    except Exception as e:  # every outcome is compared
        return False, e


def _stock_builtin(e: BaseException) -> type[BaseException]:
    return next(c for c in type(e).__mro__ if c.__module__ == "builtins")


def _functional(strict: bool | None) -> Callable[[Any, Any, dict], Any]:
    def call(x: Any, t: Any, kw: dict) -> Any:
        return safeloss.cross_entropy(x, t, **kw, strict=strict)
    return call


def _stock(x: Any, t: Any, kw: dict) -> Any:
    return F.cross_entropy(x, t, **kw)


def _module_stock(x: Any, t: Any, kw: dict) -> Any:
    kw = dict(kw)
    ctor = {k: kw.pop(k) for k in ("weight", "ignore_index", "reduction", "label_smoothing") if k in kw}
    return torch.nn.CrossEntropyLoss(**ctor)(x, t)


def _module_safe(x: Any, t: Any, kw: dict) -> Any:
    kw = dict(kw)
    ctor = {k: kw.pop(k) for k in ("weight", "ignore_index", "reduction", "label_smoothing") if k in kw}
    return safeloss.SafeCrossEntropyLoss(**ctor)(x, t)


def _same(ours: Any, want: Any, what: str) -> None:
    assert isinstance(ours, torch.Tensor), f"{what}: got {type(ours).__name__}"
    assert ours.dtype == want.dtype and ours.shape == want.shape, (
        f"{what}: {ours.dtype} {tuple(ours.shape)} != stock {want.dtype} {tuple(want.shape)}")
    rtol, atol = TIGHT.get(want.dtype, (4e-3, 2e-3))
    torch.testing.assert_close(ours, want, rtol=rtol, atol=atol, equal_nan=True)


def check(case: Case, stock_fn: Callable, safe_fn: Callable, strict: bool) -> None:
    x, t, kw = case.make()
    stock_ok, want = _run(lambda: stock_fn(x, t, kw))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        x, t, kw = case.make()  # fresh tensors: nothing may depend on the stock call
        ours_ok, ours = _run(lambda: safe_fn(x, t, kw))
    if ours_ok and stock_ok:
        _same(ours, want, case.id)
        return
    if not ours_ok and not isinstance(ours, SafeLossError):
        raise AssertionError(f"{case.id}: safeloss raised a non-safeloss {type(ours).__name__}") from ours
    if stock_ok and strict:  # a warning of default mode, raised: default mode must warn and match
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            x, t, kw = case.make()
            default_ok, default = _run(lambda: _functional(False)(x, t, kw))
        if default_ok:
            assert any(issubclass(w.category, safeloss.SafeLossWarning) for w in seen), (
                f"{case.id}: strict mode raises {ours!r}, default mode does not warn")
            _same(default, want, case.id)
            return
    if stock_ok:  # safeloss rejects what stock accepts: only the documented list
        for name, applies, cls, _reason in REJECTED:
            if applies(x, t, kw):
                assert isinstance(ours, cls), f"{case.id} ({name}): {type(ours).__name__}"
                return
        raise AssertionError(f"{case.id}: stock accepts, safeloss raises {type(ours).__name__}: {ours}")
    builtin = _stock_builtin(want)
    if not ours_ok and isinstance(ours, builtin):
        # ... and no builtin stock did not raise, beyond the public class's own (a TargetShapeError
        # is always a RuntimeError): `except ValueError` must not catch what stock lets through.
        public = type(ours).__mro__[1] if "stock_builtin" in type(ours).__dict__ else type(ours)
        extra = {c for c in type(ours).__mro__ if c.__module__ == "builtins"} - set(builtin.__mro__) \
            - set(public.__mro__)
        assert not extra, f"{case.id}: stock raises {builtin.__name__}, safeloss's error is also {extra}"
        return
    # safeloss accepted, or raised another class: only through a documented conversion, after
    # which safeloss must behave exactly as stock on the converted input.
    (cx, ct, ckw), names = _convert(x, t, kw, SILENT if strict else None)
    assert names, (
        f"{case.id}: stock raises {type(want).__name__} ({str(want).splitlines()[0]}), safeloss "
        + (f"returns {ours}" if ours_ok else f"raises {type(ours).__name__}, not a {builtin.__name__}")
        + " and no documented conversion applies")
    ref_ok, ref = _run(lambda: stock_fn(cx, ct, ckw))
    if ours_ok:
        assert ref_ok, f"{case.id}: safeloss accepts after {names}, stock still rejects: {ref}"
        _same(ours, ref, f"{case.id} (after {names})")
    else:
        assert not ref_ok, f"{case.id}: after {names} stock accepts, safeloss raises {ours!r}"
        assert isinstance(ours, _stock_builtin(ref)), (
            f"{case.id}: after {names} stock raises {type(ref).__name__}, safeloss {type(ours).__name__}")


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_functional(case: Case) -> None:
    check(case, _stock, _functional(None), strict=False)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_functional_strict(case: Case) -> None:
    check(case, _stock, _functional(True), strict=True)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_module(case: Case) -> None:
    check(case, _module_stock, _module_safe, strict=False)


def test_the_sweep_is_large_and_mostly_errors() -> None:
    """A sweep that stopped generating invalid inputs would pass vacuously."""
    rejected = 0
    for case in CASES:
        rejected += not _run(lambda c=case: _stock(*c.make()))[0]
    assert len(CASES) >= 500 and rejected >= 300, (len(CASES), rejected)


# ------------------------------------------------------------------------- torch's own error inputs


def _torch_error_inputs(name: str) -> list:
    from torch.testing._internal import common_modules

    return list(getattr(common_modules, f"module_error_inputs_torch_nn_{name}")(
        None, "cpu", torch.float32, False, True))


def test_torch_module_error_inputs_cross_entropy() -> None:
    inputs = _torch_error_inputs("CrossEntropyLoss")
    assert len(inputs) >= 7
    for err in inputs:
        mi = err.module_error_input
        with pytest.raises(err.error_type) as e:
            loss = safeloss.SafeCrossEntropyLoss(*mi.constructor_input.args, **mi.constructor_input.kwargs)
            loss(*mi.forward_input.args, **mi.forward_input.kwargs)
        assert isinstance(e.value, SafeLossError), f"{err.error_regex}: {e.value!r}"


def test_torch_module_error_inputs_linear_cross_entropy() -> None:
    """LinearCrossEntropyLoss is a linear layer, then cross-entropy: its cross-entropy errors must
    come out of safeloss with the same class when the logits are computed first."""
    checked = 0
    for err in _torch_error_inputs("LinearCrossEntropyLoss"):
        mi = err.module_error_input
        args, kwargs = mi.constructor_input.args, dict(mi.constructor_input.kwargs)
        ce_kw = {k: kwargs.pop(k) for k in ("weight", "reduction", "ignore_index", "label_smoothing") if k in kwargs}
        features, target = mi.forward_input.args
        linear = torch.nn.Linear(args[0], args[1], bias=False, **kwargs)
        if features.shape[-1] != linear.in_features:
            continue  # the linear layer's own error, not cross-entropy's
        logits = linear(features).detach()
        with pytest.raises(err.error_type):
            F.cross_entropy(logits, target, **ce_kw)  # the oracle agrees with the module
        with pytest.raises(err.error_type) as e:
            safeloss.cross_entropy(logits, target, **ce_kw)
        assert isinstance(e.value, SafeLossError)
        checked += 1
    assert checked >= 4


# ------------------------------------------------------------------------------ the class mechanism


def test_issue_example_probability_targets_of_another_batch() -> None:
    with pytest.raises(ValueError, match=r"(?s)input  \(logits\) shape \(4, 2\).*target \(labels\) shape \(5, 2\)") as e:
        safeloss.cross_entropy(torch.randn(4, 2), torch.rand(5, 2).softmax(1))
    assert isinstance(e.value, safeloss.TargetShapeError) and isinstance(e.value, RuntimeError)
    assert type(e.value).__name__ == "TargetShapeError"  # tracebacks print the public name


def test_same_kind_two_builtins() -> None:
    """The class follows stock's builtin for the input: flat labels for 3-D logits differ in
    batch size (ValueError); a spatial mismatch does not (RuntimeError only)."""
    with pytest.raises(safeloss.TargetShapeError, match="flat targets for 3-D logits") as flat:
        safeloss.cross_entropy(torch.randn(2, 5, 3), torch.zeros(6, dtype=torch.long))
    with pytest.raises(safeloss.TargetShapeError, match="cannot pair this target") as spatial:
        safeloss.cross_entropy(torch.randn(2, 5, 3), torch.zeros(2, 4, dtype=torch.long))
    assert isinstance(flat.value, ValueError) and isinstance(flat.value, RuntimeError)
    assert not isinstance(spatial.value, ValueError) and type(spatial.value) is safeloss.TargetShapeError


def test_bool_labels_of_another_batch_are_a_value_error() -> None:
    with pytest.raises(safeloss.TargetDtypeError, match="boolean targets") as e:
        safeloss.cross_entropy(torch.randn(4, 2), torch.zeros(3, dtype=torch.bool))
    assert isinstance(e.value, ValueError)
    with pytest.raises(safeloss.TargetDtypeError, match="boolean targets") as e:
        safeloss.cross_entropy(torch.randn(4, 2), torch.zeros(4, dtype=torch.bool))
    assert not isinstance(e.value, ValueError)


def test_zero_d_logits_are_an_index_error_like_stock() -> None:
    with pytest.raises(safeloss.InputError, match="0-d input") as e:
        safeloss.cross_entropy(torch.tensor(0.5), torch.tensor([0]))
    assert isinstance(e.value, IndexError) and isinstance(e.value, RuntimeError)
    with pytest.raises(safeloss.InputError, match="0-d input") as e:  # stock: the target dtype first
        safeloss.cross_entropy(torch.tensor(0.5), torch.tensor(0))
    assert not isinstance(e.value, IndexError)


def test_empty_target_for_a_batch_names_both_sizes() -> None:
    with pytest.raises(safeloss.BatchSizeMismatchError, match=r"got 4 predictions but 0 targets"):
        safeloss.cross_entropy(torch.randn(4, 5), torch.zeros(0, dtype=torch.long))
    with pytest.raises(safeloss.BatchSizeMismatchError, match=r"got 0 predictions but 1 targets"):
        safeloss.cross_entropy(torch.randn(0, 5), torch.zeros(1, dtype=torch.long))


@pytest.mark.parametrize("shape", [(1, 5), (5, 1)])
def test_weight_of_shape_1_C_is_used_as_class_weights(shape: tuple[int, int]) -> None:
    x, t = torch.randn(4, 5, 3), torch.randint(0, 5, (4, 3))
    w = torch.rand(shape) + 0.5
    torch.testing.assert_close(safeloss.cross_entropy(x, t, weight=w), F.cross_entropy(x, t, weight=w))
    x2, t2 = torch.randn(4, 5), torch.randint(0, 5, (4,))  # stock rejects it here; same meaning
    torch.testing.assert_close(safeloss.cross_entropy(x2, t2, weight=w),
                               F.cross_entropy(x2, t2, weight=w.reshape(5)))
    neg = w.clone()
    neg.view(-1)[2] = -1.0
    with pytest.warns(safeloss.SafeLossWarning, match=r"1 negative entry \(classes 2\)"):
        safeloss.cross_entropy(x, t, weight=neg)


def test_weight_of_another_shape_is_still_rejected() -> None:
    with pytest.raises(safeloss.WeightError, match=r"weight has shape \(5, 5\) but the input has 5 classes"):
        safeloss.cross_entropy(torch.randn(4, 5), torch.zeros(4, dtype=torch.long), weight=torch.ones(5, 5))


def test_module_rejects_a_non_tensor_weight_at_construction() -> None:
    with pytest.raises(TypeError) as stock:
        torch.nn.CrossEntropyLoss(weight=[1.0, 2.0])
    with pytest.raises(safeloss.ArgumentTypeError, match=r"weight must be a 1-D float tensor .* got list") as e:
        safeloss.SafeCrossEntropyLoss(weight=[1.0, 2.0])
    assert isinstance(e.value, type(stock.value))


def test_variants_pickle_and_keep_their_classes() -> None:
    with pytest.raises(safeloss.TargetShapeError) as e:
        safeloss.cross_entropy(torch.randn(2, 5, 3), torch.zeros(6, dtype=torch.long))
    back = pickle.loads(pickle.dumps(e.value))
    assert type(back) is type(e.value) and back.args == e.value.args
    assert isinstance(back, ValueError) and isinstance(back, safeloss.TargetShapeError)


def test_stock_class_returns_the_public_class_when_it_already_fits() -> None:
    from safeloss.core.errors import stock_class

    assert stock_class(safeloss.TargetShapeError, RuntimeError) is safeloss.TargetShapeError
    assert stock_class(safeloss.BatchSizeMismatchError, ValueError) is safeloss.BatchSizeMismatchError
    v = stock_class(safeloss.TargetShapeError, ValueError)
    assert v is not safeloss.TargetShapeError and issubclass(v, safeloss.TargetShapeError)
    assert issubclass(v, ValueError) and v.__module__ == "safeloss"
    assert stock_class(safeloss.TargetShapeError, ValueError) is v  # one class per pair


def test_docs_list_every_builtin_and_the_intentional_differences() -> None:
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "migration.md").read_text()
    for b in ("ValueError", "IndexError", "TypeError", "NotImplementedError", "RuntimeError"):
        assert f"`{b}`" in text, b
    for name, *_ in REJECTED:
        assert name in text, name
    flat = " ".join(text.split())
    phrases = {_conv_index_dtype: "int32 / int16 / int8 labels", _conv_float_labels: "float labels holding whole numbers",
               _conv_squeeze: "`(N, 1)` / `(N, 1, d1, ...)` labels", _conv_onehot: "integer one-hot targets",
               _conv_weight: "a `weight` of another float dtype"}
    assert set(phrases) == set(CONVERSIONS)
    for conv, phrase in phrases.items():
        assert phrase in flat, conv.__name__
