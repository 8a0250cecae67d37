"""Error classes of linear_cross_entropy, swept as tests/test_error_classes.py sweeps cross_entropy:
for every input stock ``F.linear_cross_entropy`` rejects, safeloss raises a ``SafeLossError`` that
is also an instance of the builtin stock raised for *that* input (and of no other builtin beyond
its public class's); for every input stock accepts, safeloss returns stock's value. The exceptions
are the documented lists below (docs/migration.md, "Error classes"): ``CONVERSIONS`` (inputs stock
rejects whose meaning is clear: safeloss gives stock's result on the converted input) and
``REJECTED`` (inputs stock accepts that are bugs safeloss refuses).

The grid: unbatched ``(H,)`` and batched ``(N, H)`` input, plain ``(C, H)`` and K-dimensional
``(C, d, H)`` heads; targets of the expected shape, off-by-one batch and spatial sizes, extra and
missing dims, ``(N, 1)``, 0-d, ``(1,)``, ``(3,)``, flat; probability targets of matching and
mismatched shapes; every target dtype family; class weights and biases of the wrong shape or
dtype; bad ``reduction`` / ``label_smoothing`` / ``ignore_index`` values; the layer's own
mistakes (feature size, rank, dtype) and non-tensor arguments.
"""

from __future__ import annotations

import math
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

STOCK = F.linear_cross_entropy
H, C, N, D = 4, 5, 6, 3

Args = tuple[Any, Any, Any, dict[str, Any]]  # (input, linear_weight, target, keyword arguments)


@dataclass(frozen=True)
class Case:
    id: str
    make: Callable[[], Args]


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _x(batched: bool, seed: int = 0) -> torch.Tensor:
    return torch.randn((N, H) if batched else (H,), generator=_g(seed))


def _w(kdim: bool, seed: int = 1) -> torch.Tensor:
    return torch.randn((C, D, H) if kdim else (C, H), generator=_g(seed))


def _labels(shape: tuple[int, ...], dtype: torch.dtype = torch.int64, seed: int = 2) -> torch.Tensor:
    return torch.randint(0, C, shape, generator=_g(seed)).to(dtype)


def _probs(shape: tuple[int, ...], dtype: torch.dtype = torch.float32, seed: int = 3) -> torch.Tensor:
    cdim = 0 if len(shape) == 1 else 1
    return torch.randn(shape, generator=_g(seed)).softmax(cdim).to(dtype)


LAYOUTS = {"1d": (False, False), "2d": (True, False), "kdim": (True, True)}


def _shapes(batched: bool, kdim: bool) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(class-index target shape, logits shape)."""
    out = (D,) if kdim else ()
    lead = (N,) if batched else ()
    return lead + out, lead + (C,) + out


def _target_shapes(exp: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    shapes = {"expected": exp, "0-d": (), "(1,)": (1,), "(3,)": (3,), "(0,)": (0,),
              "extra-last": exp + (1,), "(1, 1)": (1, 1)}
    if exp:
        shapes |= {"batch+1": (exp[0] + 1,) + exp[1:], "batch-1": (exp[0] - 1,) + exp[1:],
                   "singleton-dim1": exp[:1] + (1,) + exp[1:], "missing-last": exp[:-1],
                   "flat": (math.prod(exp),), "transposed": exp[::-1]}
        if len(exp) > 1:
            shapes |= {"spatial+1": exp[:-1] + (exp[-1] + 1,)}
    return shapes


def _grid() -> list[Case]:
    cases: list[Case] = []

    def add(id_: str, make: Callable[[], Args]) -> None:
        cases.append(Case(id_, make))

    for lname, (batched, kdim) in LAYOUTS.items():
        exp, logits = _shapes(batched, kdim)
        def mk(b: bool = batched, k: bool = kdim) -> tuple[torch.Tensor, torch.Tensor]:
            return _x(b), _w(k)
        for tname, tsh in _target_shapes(exp).items():
            for dt in (torch.int64, torch.int32, torch.uint8, torch.float32, torch.bool):
                add(f"{lname}-index-{tname}-{dt}".replace("torch.", ""),
                    lambda mk=mk, tsh=tsh, dt=dt: (*mk(), _labels(tsh, dt), {}))
        for what, fill in (("C", C), ("-1", -1), ("-100", -100)):
            def bad(mk=mk, exp=exp, fill=fill) -> Args:
                t = _labels(exp)
                t.view(-1)[0] = fill
                return (*mk(), t, {})
            add(f"{lname}-label-{what}", bad)
        for what, fill in (("fraction", 0.5), ("nan", math.nan)):
            def flt(mk=mk, exp=exp, fill=fill) -> Args:
                t = _labels(exp, torch.float32)
                t.view(-1)[0] = fill
                return (*mk(), t, {})
            add(f"{lname}-float-label-{what}", flt)
        pshapes = {"same": logits}
        if batched:
            pshapes |= {"batch+1": (logits[0] + 1,) + logits[1:], "C+1": logits[:1] + (C + 1,) + logits[2:]}
        else:
            pshapes |= {"C+1": (C + 1,)}
        for pname, psh in pshapes.items():
            for dt in (torch.float32, torch.float64, torch.int64):
                add(f"{lname}-prob-{pname}-{dt}".replace("torch.", ""),
                    lambda mk=mk, psh=psh, dt=dt: (*mk(), _probs(psh, dt), {}))
            add(f"{lname}-prob-{pname}-ignore_index=0",
                lambda mk=mk, psh=psh: (*mk(), _probs(psh), {"ignore_index": 0}))
        if batched:
            def onehot(mk=mk, exp=exp, dt=torch.int64) -> Args:
                t = F.one_hot(_labels(exp), C).movedim(-1, 1).contiguous().to(dt)
                return (*mk(), t, {})
            add(f"{lname}-onehot-int64", onehot)
            add(f"{lname}-onehot-bool", lambda f=onehot: f(dt=torch.bool))
        weights: dict[str, Callable[[], Any]] = {
            "len-1": lambda: torch.ones(C - 1), "len+1": lambda: torch.ones(C + 1),
            "(1,C)": lambda: torch.rand(1, C, generator=_g(4)) + 0.5, "0-d": lambda: torch.tensor(1.0),
            "int64": lambda: torch.ones(C, dtype=torch.int64),
            "float64": lambda: torch.rand(C, generator=_g(4), dtype=torch.float64) + 0.5,
            "list": lambda: [1.0] * C, "requires-grad": lambda: torch.ones(C, requires_grad=True),
        }
        for wname, w in weights.items():
            add(f"{lname}-weight-{wname}", lambda mk=mk, exp=exp, w=w: (*mk(), _labels(exp), {"weight": w()}))
            if wname in ("len+1", "int64", "float64"):
                add(f"{lname}-prob-weight-{wname}",
                    lambda mk=mk, logits=logits, w=w: (*mk(), _probs(logits), {"weight": w()}))
        bshape = (C, D) if kdim else (C,)
        for bname, b in {"right": lambda s=bshape: torch.randn(s, generator=_g(5)),
                         "(H,)": lambda: torch.randn(H, generator=_g(5)),
                         "flat": lambda s=bshape: torch.randn(math.prod(s) + 1, generator=_g(5)),
                         "int64": lambda s=bshape: torch.zeros(s, dtype=torch.long),
                         "float64": lambda s=bshape: torch.randn(s, generator=_g(5), dtype=torch.float64),
                         "list": lambda: [0.0] * C}.items():
            add(f"{lname}-bias-{bname}", lambda mk=mk, exp=exp, b=b: (*mk(), _labels(exp), {"linear_bias": b()}))
        for name, kw in [
            ("reduction-avg", {"reduction": "avg"}), ("reduction-None", {"reduction": None}),
            ("label_smoothing-1.5", {"label_smoothing": 1.5}), ("label_smoothing--0.1", {"label_smoothing": -0.1}),
            ("label_smoothing-True", {"label_smoothing": True}), ("label_smoothing-str", {"label_smoothing": "0.1"}),
            ("ignore_index-1.5", {"ignore_index": 1.5}), ("ignore_index-str", {"ignore_index": "a"}),
            ("ignore_index-True", {"ignore_index": True}), ("ignore_index-tensor", {"ignore_index": torch.tensor(1)}),
            ("options-dict", {"options": {}}),
        ]:
            add(f"{lname}-{name}", lambda mk=mk, exp=exp, kw=kw: (*mk(), _labels(exp), dict(kw)))
        for dt in (torch.int64, torch.float64, torch.float16):
            add(f"{lname}-input-{dt}".replace("torch.", ""),
                lambda b=batched, k=kdim, exp=exp, dt=dt: ((_x(b) * 3).to(dt), _w(k), _labels(exp), {}))
        for what, make_w in (("features+1", lambda k=kdim: torch.randn((C, D, H + 1) if k else (C, H + 1))),
                             ("1-d", lambda: torch.randn(H)), ("int", lambda k=kdim: _w(k).long())):
            add(f"{lname}-linear_weight-{what}", lambda b=batched, exp=exp, mw=make_w: (_x(b), mw(), _labels(exp), {}))
    for name, make in {
        "0-d-input": lambda: (torch.tensor(1.0), _w(False), torch.tensor(0), {}),
        "3-d-input": lambda: (torch.randn(2, 3, H), _w(False), _labels((2, 3)), {}),
        "input-list": lambda: ([[1.0] * H], _w(False), _labels((1,)), {}),
        "weight-list": lambda: (_x(True), [[1.0] * H] * C, _labels((N,)), {}),
        "target-list": lambda: (_x(True), _w(False), [0] * N, {}),
        "target-None": lambda: (_x(True), _w(False), None, {}),
        "empty-batch": lambda: (torch.randn(0, H), _w(False), torch.zeros(0, dtype=torch.long), {"reduction": "sum"}),
        "empty-batch-0-d-target": lambda: (torch.randn(0, H), _w(False), torch.tensor(0), {}),
        "single-class": lambda: (_x(True), torch.randn(1, H), torch.zeros(N, dtype=torch.long), {}),
        "no-classes": lambda: (_x(True), torch.randn(0, H), torch.full((N,), -100), {}),
    }.items():
        add(name, make)
    return cases


CASES = _grid()


# ------------------------------------------------------------------------------------- the lists


def _logits_shape(x: Any, w: Any) -> tuple[int, ...] | None:
    if not (isinstance(x, torch.Tensor) and isinstance(w, torch.Tensor)) or x.dim() not in (1, 2) or w.dim() < 2:
        return None
    return tuple(x.shape[:-1]) + (w.shape[0],) + tuple(w.shape[1:-1])


def _index_shaped(x: Any, w: Any, t: Any) -> bool:
    ls = _logits_shape(x, w)
    return ls is not None and isinstance(t, torch.Tensor) and tuple(t.shape) != ls


def _conv_index_dtype(x: Any, w: Any, t: Any, kw: dict) -> Args | None:
    """int32 / int16 / int8 / uint8 labels: lossless, used as int64."""
    if _index_shaped(x, w, t) and not t.is_floating_point() and not t.is_complex() \
            and t.dtype not in (torch.int64, torch.bool):
        return x, w, t.long(), kw
    return None


def _conv_float_labels(x: Any, w: Any, t: Any, kw: dict) -> Args | None:
    """Float labels holding whole numbers: used as class indices (warning; strict: error)."""
    if _index_shaped(x, w, t) and t.is_floating_point() and bool((torch.isfinite(t) & (t == t.round())).all()):
        return x, w, t.long(), kw
    return None


def _conv_squeeze(x: Any, w: Any, t: Any, kw: dict) -> Args | None:
    """``(N, 1, d1..)`` labels for ``(N, C, d1..)`` logits: squeezed (warning; strict: error)."""
    ls = _logits_shape(x, w)
    if ls is not None and len(ls) >= 2 and isinstance(t, torch.Tensor) and t.dim() == len(ls) \
            and t.shape[1] == 1 and t.shape[:1] + t.shape[2:] == ls[:1] + ls[2:] and not t.is_floating_point() \
            and (tuple(t.shape) != ls or ls[1] == 1):
        return x, w, t.squeeze(1), kw
    return None


def _conv_onehot(x: Any, w: Any, t: Any, kw: dict) -> Args | None:
    """Integer or bool one-hot targets of the logits' shape: used as probabilities (warning)."""
    ls = _logits_shape(x, w)
    if ls is not None and isinstance(t, torch.Tensor) and tuple(t.shape) == ls and not t.is_floating_point():
        return x, w, t.to(x.dtype), kw
    return None


def _conv_weight(x: Any, w: Any, t: Any, kw: dict) -> Args | None:
    """A float class ``weight`` of another dtype (cast, for class-index targets), or of shape
    (1, C) / (C, 1) (flattened; stock takes those for K-dimensional heads only)."""
    cw = kw.get("weight")
    ls = _logits_shape(x, w)
    if not (isinstance(cw, torch.Tensor) and ls is not None and cw.is_floating_point()):
        return None
    new = cw
    if cw.dim() != 1 and cw.numel() == ls[min(1, len(ls) - 1)] and max(cw.shape) == cw.numel():
        new = new.reshape(-1)
    if new.dtype != x.dtype and _index_shaped(x, w, t):
        new = new.to(x.dtype)
    return (x, w, t, {**kw, "weight": new}) if new is not cw else None


CONVERSIONS = [_conv_index_dtype, _conv_float_labels, _conv_squeeze, _conv_onehot, _conv_weight]
SILENT = {_conv_index_dtype, _conv_weight}

REJECTED: list[tuple[str, Callable[[Any, Any, Any, dict], bool], type[SafeLossError]]] = [
    ("label_smoothing < 0 or NaN",
     lambda x, w, t, kw: isinstance(kw.get("label_smoothing"), float) and not 0 <= kw["label_smoothing"] <= 1,
     safeloss.LabelSmoothingError),
    ("label_smoothing=True", lambda x, w, t, kw: kw.get("label_smoothing") is True, safeloss.ArgumentTypeError),
    ("options that is not a LinearCrossEntropyOptions",
     lambda x, w, t, kw: kw.get("options") is not None
     and not isinstance(kw["options"], torch.nn.LinearCrossEntropyOptions),
     safeloss.ArgumentTypeError),
    ("integer weight with probability targets",
     lambda x, w, t, kw: isinstance(kw.get("weight"), torch.Tensor) and not kw["weight"].is_floating_point()
     and isinstance(t, torch.Tensor) and tuple(t.shape) == _logits_shape(x, w),
     safeloss.WeightError),
]


def _convert(x: Any, w: Any, t: Any, kw: dict, allowed: Any = None) -> tuple[Args, list[str]]:
    names = []
    for conv in CONVERSIONS:
        if allowed is not None and conv not in allowed:
            continue
        out = conv(x, w, t, kw)
        if out is not None:
            (x, w, t, kw), names = out, names + [conv.__name__]
    return (x, w, t, kw), names


def _run(fn: Callable[[], Any]) -> tuple[bool, Any]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return True, fn()
    except Exception as e:  # every outcome is compared
        return False, e


def _builtin(e: BaseException) -> type[BaseException]:
    return next(c for c in type(e).__mro__ if c.__module__ == "builtins")


def _stock(x: Any, w: Any, t: Any, kw: dict) -> Any:
    return STOCK(x, w, t, **kw)


def _ours(strict: bool | None) -> Callable[[Any, Any, Any, dict], Any]:
    def call(x: Any, w: Any, t: Any, kw: dict) -> Any:
        return safeloss.linear_cross_entropy(x, w, t, **kw, strict=strict)
    return call


def _same(ours: Any, want: Any, what: str, precision: torch.dtype = torch.float64) -> None:
    """``precision``: the input's dtype (a float64 loss from float32 hidden states and float64
    probabilities is float32-accurate: stock's log-probabilities are float32 there)."""
    assert isinstance(ours, torch.Tensor), f"{what}: got {type(ours).__name__}"
    assert ours.dtype == want.dtype and ours.shape == want.shape, (
        f"{what}: {ours.dtype} {tuple(ours.shape)} != stock {want.dtype} {tuple(want.shape)}")
    dt = precision if precision in TIGHT and want.dtype in TIGHT and \
        TIGHT[precision][0] > TIGHT[want.dtype][0] else want.dtype
    rtol, atol = TIGHT.get(dt, (4e-3, 2e-3))
    torch.testing.assert_close(ours, want, rtol=rtol, atol=atol, equal_nan=True)


def check(case: Case, strict: bool) -> None:
    stock_ok, want = _run(lambda: _stock(*case.make()))
    x, w, t, kw = case.make()  # fresh tensors: nothing may depend on the stock call
    ours_ok, ours = _run(lambda: _ours(True if strict else None)(x, w, t, kw))
    prec = x.dtype if isinstance(x, torch.Tensor) else torch.float64
    if ours_ok and stock_ok:
        _same(ours, want, case.id, prec)
        return
    if not ours_ok and not isinstance(ours, SafeLossError):
        raise AssertionError(f"{case.id}: safeloss raised a non-safeloss {type(ours).__name__}: {ours}") from ours
    if stock_ok and strict:  # a warning of default mode, raised: default mode must accept and match
        default_ok, default = _run(lambda: _ours(False)(*case.make()))
        if default_ok:
            _same(default, want, case.id, prec)
            return
    if stock_ok:
        for name, applies, cls in REJECTED:
            if applies(x, w, t, kw):
                assert isinstance(ours, cls), f"{case.id} ({name}): {type(ours).__name__}"
                return
        raise AssertionError(f"{case.id}: stock accepts, safeloss raises {type(ours).__name__}: {ours}")
    builtin = _builtin(want)
    if not ours_ok and isinstance(ours, builtin):
        public = type(ours).__mro__[1] if "stock_builtin" in type(ours).__dict__ else type(ours)
        extra = {c for c in type(ours).__mro__ if c.__module__ == "builtins"} - set(builtin.__mro__) \
            - set(public.__mro__)
        assert not extra, f"{case.id}: stock raises {builtin.__name__}, safeloss's error is also {extra}"
        return
    (cx, cw_, ct, ckw), names = _convert(x, w, t, kw, SILENT if strict else None)
    assert names, (
        f"{case.id}: stock raises {type(want).__name__} ({str(want).splitlines()[0]}), safeloss "
        + (f"returns {ours}" if ours_ok else f"raises {type(ours).__name__} ({str(ours).splitlines()[0]}), "
           f"not a {builtin.__name__}") + " and no documented conversion applies")
    ref_ok, ref = _run(lambda: _stock(cx, cw_, ct, ckw))
    if ours_ok:
        assert ref_ok, f"{case.id}: safeloss accepts after {names}, stock still rejects: {ref}"
        _same(ours, ref, f"{case.id} (after {names})", prec)
    else:
        assert not ref_ok, f"{case.id}: after {names} stock accepts, safeloss raises {ours!r}"
        assert isinstance(ours, _builtin(ref)), (
            f"{case.id}: after {names} stock raises {type(ref).__name__}, safeloss {type(ours).__name__}")


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_functional(case: Case) -> None:
    check(case, strict=False)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_functional_strict(case: Case) -> None:
    check(case, strict=True)


def test_the_sweep_is_large_and_mostly_errors() -> None:
    """A sweep that stopped generating invalid inputs would pass vacuously."""
    rejected = sum(not _run(lambda c=c: _stock(*c.make()))[0] for c in CASES)
    assert len(CASES) >= 300 and rejected >= 150, (len(CASES), rejected)


def test_unbatched_input_with_a_batch_of_labels_is_a_value_error_like_stock() -> None:
    """The issue's example: an ``(H,)`` input with a ``(3,)`` target."""
    with pytest.raises(ValueError, match="1D target must have size 1"):
        STOCK(torch.randn(H), torch.randn(C, H), torch.tensor([0, 1, 2]))
    with pytest.raises(safeloss.TargetShapeError, match=r"one sample of 4 features") as e:
        safeloss.linear_cross_entropy(torch.randn(H), torch.randn(C, H), torch.tensor([0, 1, 2]))
    assert isinstance(e.value, ValueError) and isinstance(e.value, RuntimeError)


def test_docs_list_the_conversions_and_rejections() -> None:
    from pathlib import Path

    text = " ".join((Path(__file__).resolve().parents[1] / "docs" / "migration.md").read_text().split())
    assert "linear_cross_entropy" in text
    for name, *_ in REJECTED:
        assert name in text, name
