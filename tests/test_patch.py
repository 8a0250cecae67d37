"""safeloss.patch(): what it reaches, that values and gradients stay stock torch's, and that
unpatch() leaves nothing behind."""

from __future__ import annotations

import importlib
import sys
import types
import warnings

import pytest
import torch
import torch.nn.functional as F

import safeloss
from safeloss.patch import is_patched, patch, unpatch

# The module itself (the name safeloss.patch may be the function once exported there).
sp = importlib.import_module("safeloss.patch")

STOCK_F = F.cross_entropy
STOCK_FORWARD = torch.nn.CrossEntropyLoss.__dict__["forward"]


pytestmark = pytest.mark.usefixtures("clean_patch")  # tests/conftest.py


def _bad() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(4, 5), torch.tensor([0, 1, 7, 2])


# ------------------------------------------------------------------------- install / uninstall


def test_patch_replaces_and_unpatch_restores_the_very_same_objects() -> None:
    assert not is_patched()
    patch()
    assert is_patched()
    assert F.cross_entropy is sp.cross_entropy
    assert torch.nn.functional.cross_entropy is sp.cross_entropy
    assert torch.nn.CrossEntropyLoss.forward is sp._forward
    unpatch()
    assert not is_patched()
    assert F.cross_entropy is STOCK_F
    assert torch.nn.CrossEntropyLoss.__dict__["forward"] is STOCK_FORWARD


def test_patch_is_idempotent() -> None:
    patch()
    patch()
    assert F.cross_entropy is sp.cross_entropy  # not wrapped twice
    assert sp._saved_function is STOCK_F
    unpatch()  # one unpatch undoes any number of patch() calls
    assert F.cross_entropy is STOCK_F
    unpatch()  # and a second one is a no-op
    assert F.cross_entropy is STOCK_F


def test_context_manager_form_restores_on_exit_and_on_error() -> None:
    with patch() as handle:
        assert is_patched() and handle.strict is None
    assert not is_patched()
    with pytest.raises(safeloss.TargetOutOfRangeError, match=r"outside the class range 0\.\.4"), patch():
        F.cross_entropy(*_bad())
    assert not is_patched()
    assert F.cross_entropy is STOCK_F


def test_nested_with_blocks_keep_the_outer_patch() -> None:
    patch()
    with patch(strict=True):
        assert sp._current is not None and sp._current.strict is True
    assert is_patched() and sp._current is not None and sp._current.strict is None
    unpatch()
    assert not is_patched()


def test_unpatch_inside_a_with_block() -> None:
    with patch():
        unpatch()
        assert not is_patched()
    assert not is_patched() and F.cross_entropy is STOCK_F


def test_patch_rejects_a_non_bool_strict() -> None:
    with pytest.raises(safeloss.ArgumentTypeError, match=r"strict=\.\.\.\) takes True, False or None, got 'yes'"):
        patch(strict="yes")  # type: ignore[arg-type]
    assert not is_patched()


def test_unpatch_keeps_a_later_patch_by_someone_else() -> None:
    patch()

    def theirs(*args: object, **kwargs: object) -> torch.Tensor:
        return STOCK_F(*args, **kwargs)  # type: ignore[arg-type]

    F.cross_entropy = theirs
    try:
        unpatch()
        assert F.cross_entropy is theirs
    finally:
        F.cross_entropy = STOCK_F


# ------------------------------------------------------------------------- what is reached


def test_functional_is_reached() -> None:
    x, y = _bad()
    with pytest.raises(IndexError, match="Target 7 is out of bounds"):
        F.cross_entropy(x, y)
    with pytest.raises(safeloss.TargetOutOfRangeError, match=r"outside the class range 0\.\.4"), patch():
        torch.nn.functional.cross_entropy(x, y)


def test_module_created_before_patch_and_captured_class_are_reached() -> None:
    from torch.nn import CrossEntropyLoss  # a reference captured before patch()

    before = torch.nn.CrossEntropyLoss()
    x, y = _bad()
    with patch():
        with pytest.raises(safeloss.TargetOutOfRangeError, match=r"outside the class range 0\.\.4"):
            before(x, y)
        with pytest.raises(safeloss.TargetOutOfRangeError, match=r"outside the class range 0\.\.4"):
            CrossEntropyLoss(ignore_index=0)(x, y)
    with pytest.raises(IndexError, match="Target 7 is out of bounds") as info:
        before(x, y)
    assert not isinstance(info.value, safeloss.SafeLossError)


def test_subclass_calling_super_forward_is_reached() -> None:
    class Scaled(torch.nn.CrossEntropyLoss):
        def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return 2 * super().forward(input, target)

    x, y = _bad()
    with patch(), pytest.raises(safeloss.TargetOutOfRangeError, match="outside the class range"):
        Scaled()(x, y)


def test_patched_stock_module_checks_its_reduction_at_forward() -> None:
    loss = torch.nn.CrossEntropyLoss(reduction="avg")  # stock accepts this until forward
    with patch(), pytest.raises(safeloss.ReductionError, match="'avg' is not a valid reduction"):
        loss(torch.randn(2, 3), torch.tensor([0, 1]))


def test_captured_function_reference_in_an_imported_module_is_rebound_and_restored() -> None:
    mod = types.ModuleType("fake_client_captured")
    exec("from torch.nn.functional import cross_entropy\n", mod.__dict__)
    sys.modules[mod.__name__] = mod
    try:
        with patch():
            assert mod.cross_entropy is sp.cross_entropy
            with pytest.raises(safeloss.TargetOutOfRangeError, match="outside the class range"):
                mod.cross_entropy(*_bad())
        assert mod.cross_entropy is STOCK_F
    finally:
        del sys.modules[mod.__name__]


def test_module_imported_while_patched_gets_stock_back() -> None:
    with patch():
        mod = types.ModuleType("fake_client_late")
        exec("from torch.nn.functional import cross_entropy\n", mod.__dict__)
        sys.modules[mod.__name__] = mod
        assert mod.cross_entropy is sp.cross_entropy
    try:
        assert mod.cross_entropy is STOCK_F
    finally:
        del sys.modules[mod.__name__]


def test_an_escaped_reference_behaves_as_stock_after_unpatch() -> None:
    with patch():
        kept = F.cross_entropy  # e.g. stored in a closure or a default argument
        other = torch.nn.CrossEntropyLoss.forward
    x, y = _bad()
    with pytest.raises(IndexError, match="Target 7 is out of bounds") as info:
        kept(x, y)
    assert not isinstance(info.value, safeloss.SafeLossError)
    with pytest.raises(IndexError, match="Target 7 is out of bounds") as info:
        other(torch.nn.CrossEntropyLoss(), x, y)
    assert not isinstance(info.value, safeloss.SafeLossError)


def test_tensor_subclasses_keep_stock_dispatch() -> None:
    seen: list[str] = []

    class Traced(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            seen.append(getattr(func, "__name__", str(func)))
            return super().__torch_function__(func, types, args, kwargs or {})

    x, y = _bad()
    with patch(), pytest.raises(IndexError, match="Target 7 is out of bounds") as info:
        F.cross_entropy(x.as_subclass(Traced), y)
    assert not isinstance(info.value, safeloss.SafeLossError)
    assert "cross_entropy" in seen  # stock's own __torch_function__ dispatch ran


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_torchscript_still_compiles_and_runs_stock() -> None:
    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.loss = torch.nn.CrossEntropyLoss(label_smoothing=0.1)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(x, y) + self.loss(x, y)

    x, y = torch.randn(4, 5), torch.tensor([0, 1, 4, 2])
    with patch():
        scripted = torch.jit.script(Model())
        got = scripted(x, y)
    torch.testing.assert_close(got, Model()(x, y))


# ------------------------------------------------------------------------- same numbers as stock


CASES: list[dict[str, object]] = [
    {},
    {"reduction": "sum"},
    {"reduction": "none"},
    {"ignore_index": 1},
    {"label_smoothing": 0.2},
    {"weight": torch.tensor([1.0, 2.0, 0.5, 1.0, 3.0], dtype=torch.float64)},
    {"weight": torch.tensor([1.0, 2.0, 0.5, 1.0, 3.0], dtype=torch.float64), "ignore_index": 2, "label_smoothing": 0.1},
    {"size_average": False},
    {"reduce": False},
]


@pytest.mark.parametrize("kwargs", CASES, ids=lambda k: ",".join(k) or "default")
@pytest.mark.parametrize("api", ["functional", "module"])
def test_values_and_gradients_match_stock(api: str, kwargs: dict[str, object]) -> None:
    torch.manual_seed(0)
    x = torch.randn(6, 5, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 4, 1])

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        xi = x.clone().requires_grad_()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch's legacy-argument warning
            if api == "functional":
                out = F.cross_entropy(xi, y, **kwargs)  # type: ignore[arg-type]
            else:
                out = torch.nn.CrossEntropyLoss(**kwargs)(xi, y)  # type: ignore[arg-type]
        out.sum().backward()
        assert xi.grad is not None
        return out.detach(), xi.grad

    want = run()
    with patch():
        got = run()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_positional_arguments_and_probability_targets_match_stock() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 3, 2)
    p = torch.softmax(torch.randn(4, 3, 2), dim=1)
    w = torch.tensor([1.0, 0.5, 2.0])
    want = STOCK_F(x, p, w, None, -100, None, "sum", 0.1)
    with patch():
        got = F.cross_entropy(x, p, w, None, -100, None, "sum", 0.1)
    torch.testing.assert_close(got, want)


# ------------------------------------------------------------------------- strictness, warnings


def _softmaxed() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(8, 4).softmax(dim=1), torch.randint(0, 4, (8,))


def test_default_patch_warns_once_per_module() -> None:
    x, y = _softmaxed()
    loss = torch.nn.CrossEntropyLoss()
    with patch(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            loss(x, y)
    msgs = [w for w in caught if issubclass(w.category, safeloss.SafeLossWarning)]
    assert len(msgs) == 1
    assert "looks already softmaxed" in str(msgs[0].message)
    assert msgs[0].filename == __file__  # points at the user's line, not at safeloss or torch


def test_strict_patch_raises() -> None:
    x, y = _softmaxed()
    with patch(strict=True), pytest.raises(safeloss.InputError, match="looks already softmaxed"):
        F.cross_entropy(x, y)


def test_patch_strict_none_follows_strict_mode() -> None:
    x, y = _softmaxed()
    with patch(), safeloss.strict_mode(), pytest.raises(safeloss.InputError, match="softmaxed"):
        torch.nn.CrossEntropyLoss()(x, y)
    with patch(strict=False), safeloss.strict_mode(), pytest.warns(safeloss.SafeLossWarning, match="softmaxed"):
        torch.nn.CrossEntropyLoss()(x, y)  # the patch's explicit strict=False wins


def test_safeloss_own_api_is_not_routed_twice() -> None:
    """Inside safeloss, stock F.cross_entropy computes the per-position losses: under patch() that
    call must go to stock torch, not back into safeloss (recursion, doubled checks, or the patch's
    strictness overriding the module's own)."""
    x, y = _softmaxed()
    loss = safeloss.SafeCrossEntropyLoss(strict=False)
    with patch(strict=True), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = loss(x, y)
        out_f = safeloss.cross_entropy(x, y, strict=False)
    assert len([w for w in caught if issubclass(w.category, safeloss.SafeLossWarning)]) == 2
    torch.testing.assert_close(out, STOCK_F(x, y))
    torch.testing.assert_close(out_f, STOCK_F(x, y))


def _compiled_mismatch_error() -> BaseException:
    """The error a fullgraph torch.compile of a patched F.cross_entropy raises on a batch mismatch."""

    class M(torch.nn.Module):
        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(x, y)

    torch._dynamo.reset()
    with pytest.raises(Exception) as info:
        torch.compile(M(), backend="eager", fullgraph=True)(torch.randn(4, 3), torch.tensor([0, 1, 2]))
    return info.value


def test_dynamo_traces_the_patched_function_after_its_table_was_cleared() -> None:
    """torch.distributed.init_process_group clears Dynamo's table of torch functions; rebuilt while
    patched, it took safeloss's function for a torch op (run unread on fake tensors: the mismatch
    surfaced as Dynamo's TorchRuntimeError). patch() builds it first, with stock's function."""
    import torch._dynamo.trace_rules as rules

    from safeloss.patch import cross_entropy as patched

    rules.clear_lru_cache()  # what init_process_group does
    try:
        with patch():
            assert patched not in rules.get_torch_obj_rule_map()
            err = _compiled_mismatch_error()
        assert type(err).__name__ == "Unsupported", err  # Dynamo traced our code, which raised
        assert "BatchSizeMismatchError" in repr([err.__cause__, err.__context__])
        assert rules.get_torch_obj_rule_map()[F.cross_entropy] is not None
    finally:
        rules.clear_lru_cache()
        rules.get_torch_obj_rule_map()


def test_a_table_rebuilt_while_patched_is_repaired_at_the_next_patch() -> None:
    import torch._dynamo.trace_rules as rules

    from safeloss.patch import cross_entropy as patched

    stock = F.cross_entropy
    try:
        with patch():
            rules.clear_lru_cache()  # e.g. init_process_group inside the patch
            assert patched in rules.get_torch_obj_rule_map()  # rebuilt under our name
        with patch():
            table = rules.get_torch_obj_rule_map()
            assert patched not in table and stock in table
    finally:
        rules.clear_lru_cache()
        rules.get_torch_obj_rule_map()
