"""The loss modules used as nn.Modules, the way a PyTorch engineer uses the stock ones: buffers,
state_dicts, attribute assignment after construction (also after calls that stored a plan),
hooks, keyword calls, copies, serialization. Each case runs the safeloss module and its stock
counterpart side by side and asks for the same values (and gradients)."""

from __future__ import annotations

import copy
import io
import pickle
from collections.abc import Callable

import pytest
import torch
from torch import nn

import safeloss
from safeloss import SafeCrossEntropyLoss, SafeLinearCrossEntropyLoss
from tests.tolerances import assert_matches

C, H, N = 3, 5, 4
W = torch.tensor([1.0, 0.0, 3.0])  # a zero class weight: dropping the weight changes the value


def _data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, C, generator=g)
    h = torch.randn(N, H, generator=g)
    y = torch.tensor([0, 1, 2, 1])
    p = torch.rand(N, C, generator=g).softmax(1)
    return x, h, y, p


def _pair(linear: bool, **kw: object) -> tuple[nn.Module, nn.Module]:
    """(safeloss module, stock module) with the same parameters."""
    if linear:
        torch.manual_seed(0)
        ours = SafeLinearCrossEntropyLoss(H, C, **kw)
        stock = nn.LinearCrossEntropyLoss(H, C, **kw)
        stock.load_state_dict(ours.state_dict())
        return ours, stock
    return SafeCrossEntropyLoss(**kw), nn.CrossEntropyLoss(**kw)


# Assignments after construction that nn.Module allows; the class weight one moves "weight" from
# the buffers to the parameters (nn.Module.__setattr__), where the module must still find it.
CHANGES: dict[str, Callable[[nn.Module], None]] = {
    "weight->Parameter(no grad)": lambda m: setattr(m, "weight", nn.Parameter(W.clone(), requires_grad=False)),
    "weight->None": lambda m: setattr(m, "weight", None),
    "weight->other tensor": lambda m: setattr(m, "weight", W * 2),
    "weight in place": lambda m: m.weight.mul_(torch.tensor([0.0, 1.0, 1.0])),
    "ignore_index=1": lambda m: setattr(m, "ignore_index", 1),
    "reduction=sum": lambda m: setattr(m, "reduction", "sum"),
    "reduction=none": lambda m: setattr(m, "reduction", "none"),
    "label_smoothing=0.2": lambda m: setattr(m, "label_smoothing", 0.2),
}


@pytest.mark.parametrize("calls_before", [0, 2], ids=["fresh", "after-planned-calls"])
@pytest.mark.parametrize("change", list(CHANGES), ids=list(CHANGES))
@pytest.mark.parametrize("linear", [False, True], ids=["ce", "linear"])
def test_attribute_assignment_matches_stock(linear: bool, change: str, calls_before: int) -> None:
    x, h, y, _ = _data()
    inp = h if linear else x
    ours, stock = _pair(linear, weight=torch.tensor([1.0, 2.0, 3.0]))
    for _ in range(calls_before):
        ours(inp, y)
    CHANGES[change](ours)
    CHANGES[change](stock)
    want = stock(inp, y)
    for i in range(3):  # the first call stores a plan, the next ones run it
        assert_matches(ours(inp, y), want, what=f"{change}, call {i}")


@pytest.mark.parametrize("linear", [False, True], ids=["ce", "linear"])
def test_weight_parameter_gets_stock_gradient(linear: bool) -> None:
    # Probability targets: stock differentiates the class weight; a Parameter must get that grad.
    x, h, _, p = _data()
    inp = h if linear else x
    ours, stock = _pair(linear)
    for m in (ours, stock):
        m.weight = nn.Parameter(W.clone())
    stock(inp, p).backward()
    for i in range(3):
        ours.weight.grad = None
        loss = ours(inp, p)
        loss.backward()
        assert_matches(ours.weight.grad, stock.weight.grad, what=f"call {i}")


@pytest.mark.parametrize("linear", [False, True], ids=["ce", "linear"])
def test_state_dict_round_trips_with_stock(linear: bool) -> None:
    ours, stock = _pair(linear, weight=torch.tensor([1.0, 2.0, 3.0]))
    assert list(ours.state_dict()) == list(stock.state_dict())
    buf = io.BytesIO()
    torch.save(ours.state_dict(), buf)
    buf.seek(0)
    fresh_stock = _pair(linear, weight=torch.zeros(C))[1]
    fresh_stock.load_state_dict(torch.load(buf, weights_only=True))
    fresh_ours = _pair(linear, weight=torch.zeros(C))[0]
    fresh_ours.load_state_dict(stock.state_dict())
    for a, b in zip(fresh_stock.state_dict().values(), fresh_ours.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    # a module built without a class weight has no such key, for both (strict load raises)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        _pair(linear)[0].load_state_dict(stock.state_dict())


@pytest.mark.parametrize("linear", [False, True], ids=["ce", "linear"])
def test_hooks_kwargs_copies_match_stock(linear: bool) -> None:
    x, h, y, _ = _data()
    inp = h if linear else x
    ours, stock = _pair(linear, weight=torch.tensor([1.0, 2.0, 3.0]), reduction="sum")
    want = stock(input=inp, target=y)
    assert_matches(ours(input=inp, target=y), want, what="keyword call")
    for m in (copy.deepcopy(ours), pickle.loads(pickle.dumps(ours))):
        assert type(m) is type(ours)
        assert_matches(m(inp, y), want, what="copy")
    for m in (ours, stock):
        m.register_forward_pre_hook(lambda mod, args: (args[0] * 2, args[1]))
        m.register_forward_hook(lambda mod, args, out: out + 1)
    assert_matches(ours(inp, y), stock(inp, y), what="hooks")


@pytest.mark.parametrize("linear", [False, True], ids=["ce", "linear"])
def test_dtype_conversion_of_the_weight_buffer(linear: bool) -> None:
    _, h, y, _ = _data()
    x = _data()[0]
    inp = (h if linear else x).double()
    ours, stock = _pair(linear, weight=torch.tensor([1.0, 2.0, 3.0]))
    ours, stock = ours.double(), stock.double()
    assert ours.weight.dtype == torch.float64
    assert_matches(ours(inp, y), stock(inp, y), what="double()")


def test_repr_names_non_default_settings() -> None:
    # documented difference (docs/migration.md): stock's repr is always "CrossEntropyLoss()"
    assert repr(SafeCrossEntropyLoss()) == "SafeCrossEntropyLoss()"
    assert repr(SafeCrossEntropyLoss(reduction="sum", label_smoothing=0.1)) == (
        "SafeCrossEntropyLoss(reduction='sum', label_smoothing=0.1)")
    assert isinstance(SafeCrossEntropyLoss(), nn.CrossEntropyLoss)
    assert safeloss.SafeLinearCrossEntropyLoss.__mro__[1] is nn.LinearCrossEntropyLoss


def test_patched_stock_linear_module_keeps_a_parameter_class_weight() -> None:
    # the patched stock module runs the same entry (safeloss.linear.api.module_forward)
    _, h, y, _ = _data()
    torch.manual_seed(0)
    m = nn.LinearCrossEntropyLoss(H, C)
    m.weight = nn.Parameter(W.clone(), requires_grad=False)
    want = m(h, y)
    with safeloss.patch():
        got = [m(h, y) for _ in range(3)]
    for i, v in enumerate(got):
        assert_matches(v, want, what=f"call {i}")


@pytest.mark.parametrize("linear", [False, True], ids=["ce", "linear"])
def test_invalid_reduction_raises_at_construction(linear: bool) -> None:
    # documented difference (docs/migration.md): stock accepts it here, fails at the first forward
    with pytest.raises(safeloss.ReductionError, match="'avg' is not a valid reduction") as info:
        SafeLinearCrossEntropyLoss(H, C, reduction="avg") if linear else SafeCrossEntropyLoss(reduction="avg")
    assert isinstance(info.value, ValueError)
