"""Every op in every setting: one grid of ops x settings (issue: one call path, one mode decision).

Each cell builds the op into a setting (compile, tracers, transforms, fake / meta tensors), runs it
on clean inputs and compares with stock torch's op run eagerly (values, and gradients where the
setting differentiates). A second grid checks that ``core.mode.decide`` names each setting.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

import safeloss
from safeloss.core.mode import Mode, decide
from tests.tolerances import TIGHT

RTOL, ATOL = TIGHT[torch.float32]

# torch's own notices about the tools exercised here (TorchScript deprecation, nested prototype).
pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype stage:UserWarning"),
]

N, H, C = 6, 5, 7


def _ce_inputs(n: int = N, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, C, generator=g)
    t = torch.randint(0, C, (n,), generator=g)
    t[0] = -100  # an ignored position
    return x, t


def _linear_inputs(n: int = N, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, H, generator=g)
    w = torch.randn(C, H, generator=g) * 0.3
    t = torch.randint(0, C, (n,), generator=g)
    t[0] = -100
    return h, w, t


def _linear_module_pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    ours = safeloss.SafeLinearCrossEntropyLoss(H, C, ignore_index=-100)
    stock = torch.nn.LinearCrossEntropyLoss(H, C, ignore_index=-100)
    with torch.no_grad():
        stock.linear.weight.copy_(ours.linear.weight)
    return ours, stock


def _hidden_inputs(n: int = N, seed: int = 0) -> tuple[torch.Tensor, ...]:
    h, _, t = _linear_inputs(n, seed)
    return h, t


_LIN_OURS, _LIN_STOCK = _linear_module_pair()

# op name -> (safeloss callable, stock callable, inputs maker (batch size, seed) -> inputs)
OPS: dict[str, tuple[Callable, Callable, Callable]] = {
    "cross_entropy": (safeloss.cross_entropy, F.cross_entropy, _ce_inputs),
    "SafeCrossEntropyLoss": (safeloss.SafeCrossEntropyLoss(), torch.nn.CrossEntropyLoss(), _ce_inputs),
    "linear_cross_entropy": (
        lambda h, w, t: safeloss.linear_cross_entropy(h, w, t, ignore_index=-100),
        lambda h, w, t: F.linear_cross_entropy(h, w, t, ignore_index=-100),
        _linear_inputs,
    ),
    "SafeLinearCrossEntropyLoss": (_LIN_OURS, _LIN_STOCK, _hidden_inputs),
}
_MAKER = {id(v[0]): v[2] for v in OPS.values()}


class _Wrap2(torch.nn.Module):
    """A model calling the op (what users trace / compile / export)."""

    def __init__(self, fn: Callable) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.fn(a, b)


class _Wrap3(_Wrap2):
    def forward(self, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.fn(a, b, c)


def _Wrap(fn: Callable, n_args: int = 2) -> torch.nn.Module:
    return _Wrap2(fn) if n_args == 2 else _Wrap3(fn)


def _compile(fn: Callable, args: tuple, dynamic: bool) -> torch.Tensor:
    torch._dynamo.reset()
    cfn = torch.compile(fn, backend="aot_eager", fullgraph=True, dynamic=dynamic)
    out = cfn(*args)
    if dynamic:  # another batch size must reuse the graph (no specialization on N)
        from torch._dynamo.utils import counters

        before = counters["stats"]["unique_graphs"]
        cfn(*_shrink(args, N + 3))
        assert counters["stats"]["unique_graphs"] == before, "recompiled for a new batch size"
    return out


def _shrink(args: tuple, n: int) -> tuple:
    """The same kind of inputs with batch size ``n`` (for dynamic-shape cells)."""
    maker = _ce_inputs if len(args) == 3 or args[0].shape[1] == C else _hidden_inputs
    return _linear_inputs(n, seed=1) if len(args) == 3 else maker(n, seed=1)


def _make_fx(fn: Callable, args: tuple, mode: str) -> torch.Tensor:
    gm = make_fx(lambda *a: fn(*a), tracing_mode=mode)(*args)
    if mode == "symbolic":  # the graph must not have baked in N
        other = _shrink(args, N + 2)
        torch.testing.assert_close(gm(*other), fn(*other), rtol=RTOL, atol=ATOL)
    return gm(*args)


def _export(fn: Callable, args: tuple) -> torch.Tensor:
    batch = torch.export.Dim("batch", min=2)
    shapes = tuple({0: batch} if a.dim() and a.shape[0] == N else None for a in args)
    ep = torch.export.export(_Wrap(fn, len(args)), args, dynamic_shapes=shapes, strict=False)
    other = _shrink(args, N + 2)
    torch.testing.assert_close(ep.module()(*other), fn(*other), rtol=RTOL, atol=ATOL)
    return ep.module()(*args)


def _fx(fn: Callable, args: tuple) -> torch.Tensor:
    gm = torch.fx.symbolic_trace(_Wrap(fn, len(args)))
    return gm(*args)


def _jit_trace(fn: Callable, args: tuple) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(_Wrap(fn, len(args)), args, check_trace=False)
    return traced(*args)


def _fake(fn: Callable, args: tuple) -> torch.Tensor:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True) as m:  # a module's parameters stay real
        fake = tuple(m.from_tensor(a) for a in args)
        out = fn(*fake)
    assert out.shape == fn(*args).shape and out.dtype == fn(*args).dtype
    return fn(*args)  # fake tensors hold no values: the shape / dtype check above is the cell


def _meta(fn: Callable, args: tuple) -> torch.Tensor:
    out = fn(*(a.to("meta") for a in args))
    ref = fn(*args)
    assert out.is_meta and out.shape == ref.shape and out.dtype == ref.dtype
    return ref


def _functionalize(fn: Callable, args: tuple) -> torch.Tensor:
    return torch.func.functionalize(fn)(*args)


SETTINGS: dict[str, Callable[[Callable, tuple], torch.Tensor]] = {
    "eager": lambda fn, args: fn(*args),
    "compile": lambda fn, args: _compile(fn, args, dynamic=False),
    "compile-dynamic": lambda fn, args: _compile(fn, args, dynamic=True),
    "jit.trace": _jit_trace,
    "fx.symbolic_trace": _fx,
    "make_fx-real": lambda fn, args: _make_fx(fn, args, "real"),
    "make_fx-fake": lambda fn, args: _make_fx(fn, args, "fake"),
    "make_fx-symbolic": lambda fn, args: _make_fx(fn, args, "symbolic"),
    "export-dynamic": _export,
    "functionalize": _functionalize,
    "FakeTensorMode": _fake,
    "meta": _meta,
}


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("op", list(OPS))
def test_op_in_setting_gives_stocks_value(op: str, setting: str) -> None:
    fn, stock, make = OPS[op]
    if setting == "meta" and isinstance(fn, torch.nn.Module) and list(fn.parameters()):
        pytest.skip("meta inputs with a CPU-parameter module: a device mismatch for stock too")
    args = make()
    try:  # where stock itself cannot run in the setting, ours fails the same way
        SETTINGS[setting](stock, args)
    except Exception as e:
        with pytest.raises(type(e)):
            SETTINGS[setting](fn, args)
        return
    expected = stock(*args)
    got = SETTINGS[setting](fn, args)
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL)


# Cells that do not work yet (each listed so that it fails loudly once fixed: strict xfail).
KNOWN_GAPS: set[tuple[str, str]] = set()


@pytest.fixture(autouse=True)
def _known_gaps(request: pytest.FixtureRequest) -> None:
    cell = (request.node.originalname, request.node.callspec.id if hasattr(request.node, "callspec") else "")
    if cell in KNOWN_GAPS:
        request.applymarker(pytest.mark.xfail(reason="known gap, see KNOWN_GAPS", strict=True))


CHECKED_SETTINGS = ["eager", "compile", "compile-dynamic", "jit.trace", "fx.symbolic_trace",
                    "make_fx-real", "make_fx-fake", "make_fx-symbolic", "export-dynamic"]


@pytest.mark.parametrize("setting", CHECKED_SETTINGS)
@pytest.mark.parametrize("op", list(OPS))
def test_bad_label_is_caught_in_setting(op: str, setting: str) -> None:
    """The checks travel with the op: a label >= C raises safeloss's error, at build or when run."""
    fn, stock, make = OPS[op]
    try:
        SETTINGS[setting](stock, make())
    except Exception:
        pytest.skip("stock cannot run in this setting either (see the values test)")
    args = list(make())
    t = args[-1].clone()
    t[2] = C + 3
    args[-1] = t
    with pytest.raises(safeloss.TargetOutOfRangeError, match=r"outside the class range"):
        SETTINGS[setting](fn, tuple(args))


def _grad_cell(fn: Callable, args: tuple) -> tuple[torch.Tensor, ...]:
    return torch.func.grad(lambda x: fn(x, *args[1:]))(args[0])


def _vmap_cell(fn: Callable, args: tuple) -> torch.Tensor:
    batched = tuple(torch.stack([a, a.flip(0)]) for a in args)
    return torch.func.vmap(fn)(*batched)


def _jvp_cell(fn: Callable, args: tuple) -> torch.Tensor:
    tangent = torch.ones_like(args[0])
    return torch.func.jvp(lambda x: fn(x, *args[1:]), (args[0],), (tangent,))[1]


TRANSFORMS = {"grad": _grad_cell, "vmap": _vmap_cell, "jvp": _jvp_cell}


@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("op", list(OPS))
def test_op_under_torch_func_matches_stock(op: str, transform: str) -> None:
    fn, stock, make = OPS[op]
    args = make()
    torch.testing.assert_close(TRANSFORMS[transform](fn, args), TRANSFORMS[transform](stock, args),
                               rtol=RTOL, atol=ATOL)


# ----------------------------------------------------------------------- the decision itself


def _decided_in(setting: str) -> Mode:
    x, t = _ce_inputs()
    seen: list[Mode] = []

    def probe(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen.append(decide(x, t))
        return x.sum()

    if setting == "eager":
        probe(x, t)
    elif setting == "compile":
        torch._dynamo.reset()
        torch.compile(probe, backend="eager", fullgraph=True)(x, t)
    elif setting == "jit.trace":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.jit.trace(probe, (x, t), check_trace=False)
    elif setting == "fx":
        torch.fx.symbolic_trace(_Wrap(probe))
    elif setting.startswith("make_fx"):
        make_fx(probe, tracing_mode=setting.split("-")[1])(x, t)
    elif setting == "vmap":
        torch.func.vmap(probe)(x.unsqueeze(0), t.unsqueeze(0))
    elif setting == "grad":
        torch.func.grad(lambda x: probe(x, t))(x)
    elif setting == "fake":
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode() as m:
            probe(m.from_tensor(x), m.from_tensor(t))
    elif setting == "meta":
        probe(x.to("meta"), t.to("meta"))
    elif setting == "sparse":
        probe(x, F.one_hot(t.clamp(min=0), C).float().to_sparse())
    elif setting == "nested":
        probe(torch.nested.nested_tensor([x, x], layout=torch.jagged), t)
    return seen[0]


@pytest.mark.parametrize(("setting", "mode"), [
    ("eager", Mode.EAGER), ("compile", Mode.COMPILE), ("jit.trace", Mode.JIT_TRACE), ("fx", Mode.FX),
    ("make_fx-real", Mode.GRAPH), ("make_fx-fake", Mode.GRAPH), ("make_fx-symbolic", Mode.GRAPH),
    ("vmap", Mode.TRANSFORM), ("grad", Mode.TRANSFORM), ("fake", Mode.ABSTRACT), ("meta", Mode.ABSTRACT),
    ("sparse", Mode.SPARSE), ("nested", Mode.SPARSE),
])
def test_decide_names_the_setting(setting: str, mode: Mode) -> None:
    assert _decided_in(setting) is mode


def test_decide_for_non_tensor_arguments_is_eager() -> None:
    """Validation names a wrong argument type; the decision must not fail first."""
    assert decide([1.0, 2.0], torch.tensor([0])) is Mode.EAGER
    assert decide(torch.randn(2, 3), None, None) is Mode.EAGER


def test_every_mode_has_a_documented_row() -> None:
    from safeloss.core.mode import TABLE

    assert set(TABLE) == set(Mode)
    for row in TABLE.values():
        assert row.checks and row.reported and row.backend
