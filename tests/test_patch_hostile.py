"""safeloss.patch() used by a hostile user: reach, fidelity against stock torch, and lifecycle
(handles reused, threads, torch's own caches of function tables), each class of misuse a test."""

from __future__ import annotations

import copy
import importlib
import pickle
import threading
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

import safeloss
from safeloss.patch import is_patched, patch, unpatch
from tests.tolerances import assert_matches

sp = importlib.import_module("safeloss.patch")
lp = importlib.import_module("safeloss.linear.patch")
STOCK_F = F.cross_entropy
STOCK_LF = getattr(F, "linear_cross_entropy", None)

pytestmark = pytest.mark.usefixtures("clean_patch")  # tests/conftest.py


def _outcome(fn: Callable[[], torch.Tensor]) -> object:
    """A call's result (value and input gradient) or its error class."""
    try:
        return fn()
    except Exception as e:  # the class is what is compared
        return type(e)


# ----------------------------------------------------------------- lifecycle: the handle itself


@pytest.mark.parametrize("ended_by", ["with", "unpatch"])
def test_a_handle_entered_again_patches_again(ended_by: str) -> None:
    """``p = safeloss.patch()`` kept and used as ``with p:`` in a loop: the second block ran
    unpatched, silently (its __enter__ did nothing once the first block had removed it)."""
    handle = patch(strict=True)
    if ended_by == "with":
        with handle:
            pass
    else:
        unpatch()
    assert not is_patched()
    for _ in range(2):
        with handle:
            assert is_patched() and F.cross_entropy is sp.cross_entropy
            with pytest.raises(safeloss.TargetShapeError):  # strict: the (N, 1) target raises
                F.cross_entropy(torch.randn(3, 4), torch.tensor([[0], [1], [2]]))
        assert not is_patched() and F.cross_entropy is STOCK_F


def test_entering_the_active_handle_does_not_stack_it_twice() -> None:
    with patch() as handle, handle:
        pass
    assert not is_patched()


# ------------------------------------------------------------ lifecycle: threads and strictness


_APIS: dict[str, Callable[..., torch.Tensor]] = {
    "functional": lambda x, t: F.cross_entropy(x, t),
    "module": lambda x, t: torch.nn.CrossEntropyLoss()(x, t),
}


@pytest.mark.parametrize("api", list(_APIS))
def test_a_with_block_s_strict_is_not_taken_over_by_another_thread_s_block(api: str) -> None:
    """Thread A's ``with patch(strict=True)`` must raise on a finding even while thread B, in
    parallel (not nested in A), is inside ``with patch(strict=False)``; before, the globally
    innermost handle (B's) applied to every thread."""
    bad = (torch.randn(4, 5), torch.tensor([[0], [1], [2], [3]]))
    a_in, b_in, a_done = threading.Event(), threading.Event(), threading.Event()
    seen: dict[str, object] = {}

    def a() -> None:
        with patch(strict=True):
            a_in.set()
            b_in.wait(10)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                seen["A"] = _outcome(lambda: _APIS[api](*bad))
            a_done.set()

    def b() -> None:
        a_in.wait(10)
        with patch(strict=False):
            b_in.set()
            a_done.wait(10)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                seen["B"] = _outcome(lambda: _APIS[api](*bad))

    threads = [threading.Thread(target=a), threading.Thread(target=b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert seen["A"] is safeloss.TargetShapeError
    assert isinstance(seen["B"], torch.Tensor)  # B's own block: not strict
    assert not is_patched() and not sp._per_thread


def test_a_thread_without_a_block_of_its_own_follows_the_innermost_handle() -> None:
    """DataParallel runs a model's forward (and a loss inside it) in worker threads: they have no
    block of their own and must keep the strictness of the block around the call."""
    bad = (torch.randn(4, 5), torch.tensor([[0], [1], [2], [3]]))
    seen: list[object] = []
    with patch(strict=True):
        worker = threading.Thread(target=lambda: seen.append(_outcome(lambda: F.cross_entropy(*bad))))
        worker.start()
        worker.join(20)
    assert seen == [safeloss.TargetShapeError]


def test_threads_entering_and_leaving_concurrently_leave_torch_stock() -> None:
    x, t = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    expected = STOCK_F(x, t)
    errors: list[BaseException] = []

    def hammer() -> None:
        try:
            for _ in range(100):
                with patch():
                    torch.testing.assert_close(F.cross_entropy(x, t), expected)
        except BaseException as e:  # reported below, in the main thread
            errors.append(e)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not errors
    assert not is_patched() and F.cross_entropy is STOCK_F
    assert "__call__" not in torch.nn.CrossEntropyLoss.__dict__


# ------------------------------------------------------- lifecycle: torch's own function tables


def _patched_functions() -> list[tuple[object, object]]:
    pairs: list[tuple[object, object]] = [(sp.cross_entropy, STOCK_F)]
    if STOCK_LF is not None:
        pairs.append((lp.linear_cross_entropy, STOCK_LF))
    return pairs


def test_dynamo_table_rebuilt_while_patched_is_given_back_at_unpatch() -> None:
    """A table rebuilt inside the patch (init_process_group clears it) held our function under
    stock's name, and kept it after unpatch(), without stock's function, until the next patch()."""
    import torch._dynamo.trace_rules as rules

    try:
        with patch():
            rules.clear_lru_cache()
            rules.get_torch_obj_rule_map()
        table = rules.get_torch_obj_rule_map()
        assert sp.cross_entropy not in table
        assert table.get(STOCK_F) is not None
    finally:
        rules.clear_lru_cache()
        rules.get_torch_obj_rule_map()


@pytest.mark.parametrize("table", ["overridable", "resolve_name", "testing_overrides"])
def test_torch_overrides_tables_built_while_patched_name_stock_after_unpatch(table: str) -> None:
    """torch.overrides caches its walk of torch.nn.functional; walked while patched, it named our
    functions, and after unpatch() ``resolve_name(F.cross_entropy)`` was None (stock: the name)."""
    import torch.overrides as ov

    caches = [ov._get_overridable_functions, ov.get_testing_overrides]
    for c in caches:
        c.cache_clear()
    try:
        with patch():  # built here, while patched
            ov.get_overridable_functions()
            ov.get_testing_overrides()
        for patched, stock in _patched_functions():
            if table == "overridable":
                listed = ov.get_overridable_functions()[torch.nn.functional]
                assert stock in listed and patched not in listed
            elif table == "resolve_name":
                name = getattr(stock, "__name__", "")
                assert ov.resolve_name(stock) == f"torch.nn.functional.{name}"
                assert ov.resolve_name(patched) is None
            else:
                overrides = ov.get_testing_overrides()
                assert stock in overrides and patched not in overrides
    finally:
        for c in caches:
            c.cache_clear()


# --------------------------------------------------------- fidelity: compiled code across states


@pytest.mark.parametrize("compiled_when", ["before", "under"])
def test_compiled_code_follows_the_patch_state_when_it_runs(compiled_when: str) -> None:
    """A graph traced under the patch must not keep running safeloss after unpatch(), nor a stock
    graph traced before the patch skip it: Dynamo's guards retrace on the state change."""
    x, bad = torch.randn(4, 5), torch.tensor([0, 1, 7, 2])
    fn = torch.compile(lambda a, b: F.cross_entropy(a, b), backend="eager")
    torch._dynamo.reset()
    if compiled_when == "before":
        assert _outcome(lambda: fn(x, bad)) is IndexError
    with patch():
        assert _outcome(lambda: fn(x, bad)) is safeloss.TargetOutOfRangeError
    assert _outcome(lambda: fn(x, bad)) is IndexError
    torch._dynamo.reset()


# -------------------------------------------------- fidelity: module state changed after creation


_MUTATIONS: dict[str, Callable[[torch.nn.CrossEntropyLoss], None]] = {
    "reduction": lambda m: setattr(m, "reduction", "sum"),
    "reduction none": lambda m: setattr(m, "reduction", "none"),
    "ignore_index": lambda m: setattr(m, "ignore_index", 2),  # -100 then is out of range
    "ignore_index back": lambda m: (setattr(m, "ignore_index", 2), setattr(m, "ignore_index", -100)),
    "label_smoothing": lambda m: setattr(m, "label_smoothing", 0.3),
    "weight set to None": lambda m: setattr(m, "weight", None),
    "weight mutated in place": lambda m: m.weight.mul_(3.0),
    "weight replaced": lambda m: setattr(m, "weight", torch.linspace(0.5, 2.0, 5)),
    "weight as a Parameter": lambda m: setattr(m, "weight", torch.nn.Parameter(torch.rand(5), requires_grad=False)),
    "double()": lambda m: m.double(),
}


@pytest.mark.parametrize("mutation", list(_MUTATIONS))
def test_module_attributes_changed_after_calls_are_honoured(mutation: str) -> None:
    """Patched calls cache a plan per signature: a module attribute changed between two calls of
    the same shapes must change the result as it does for stock."""
    torch.manual_seed(0)
    x, t = torch.randn(6, 5, dtype=torch.float64), torch.tensor([0, 1, 2, -100, 4, 2])

    def run(patched: bool) -> list[torch.Tensor]:
        torch.manual_seed(1)
        m = torch.nn.CrossEntropyLoss(weight=torch.rand(5), label_smoothing=0.1)
        with patch() if patched else _null():
            out = [_outcome(lambda: m(x.to(m.weight.dtype), t)) for _ in range(2)]
            _MUTATIONS[mutation](m)
            dtype = x.dtype if m.weight is None else m.weight.dtype
            out += [_outcome(lambda: m(x.to(dtype), t)) for _ in range(2)]
        return out

    for ours, stock in zip(run(True), run(False)):
        if isinstance(stock, type):  # an error: the same class, or a safeloss subclass of it
            assert isinstance(ours, type) and issubclass(ours, stock), (mutation, ours, stock)
        else:
            assert isinstance(ours, torch.Tensor), (mutation, ours)
            assert_matches(ours, stock, what=mutation)


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


@pytest.mark.parametrize("direction", ["made under patch, used stock", "made stock, used under patch"])
@pytest.mark.parametrize("how", ["pickle", "deepcopy", "state_dict"])
def test_a_module_crosses_patch_states(direction: str, how: str) -> None:
    x, t = torch.randn(4, 5), torch.tensor([0, -100, 3, 1])
    weight = torch.rand(5)

    def make() -> torch.nn.CrossEntropyLoss:
        return torch.nn.CrossEntropyLoss(weight=weight, label_smoothing=0.2, reduction="sum")

    expected = STOCK_F(x, t, weight=weight, label_smoothing=0.2, reduction="sum")
    first_patched = direction.startswith("made under")
    with patch() if first_patched else _null():
        m = make()
        if how == "pickle":
            blob = pickle.dumps(m)
        elif how == "deepcopy":
            m2 = copy.deepcopy(m)
        else:
            state = m.state_dict()
    with _null() if first_patched else patch():
        if how == "pickle":
            m2 = pickle.loads(blob)
        elif how == "state_dict":
            m2 = torch.nn.CrossEntropyLoss(weight=torch.ones(5), label_smoothing=0.2, reduction="sum")
            m2.load_state_dict(state)
        assert repr(m2) == "CrossEntropyLoss()"
        assert_matches(m2(x, t), expected, what=f"{how} {direction}")


# --------------------------------------------------------------------- reach: captured references


def test_reach_of_references_captured_before_patching() -> None:
    """What the docs say: module lookups, instances made before, the class captured, subclasses,
    are reached; ``... import cross_entropy as ce``-style aliases kept elsewhere are not."""
    x, bad = torch.randn(4, 5), torch.tensor([0, 1, 7, 2])
    nnf = torch.nn.functional
    alias = F.cross_entropy  # a reference kept elsewhere: documented as not reached
    before = torch.nn.CrossEntropyLoss()
    cls = torch.nn.CrossEntropyLoss

    class Sub(torch.nn.CrossEntropyLoss):
        pass

    reached = {
        "F.cross_entropy": lambda: F.cross_entropy(x, bad),
        "nn.functional looked up": lambda: nnf.cross_entropy(x, bad),
        "torch.nn.modules.loss.F": lambda: torch.nn.modules.loss.F.cross_entropy(x, bad),
        "instance made before": lambda: before(x, bad),
        "captured class": lambda: cls()(x, bad),
        "subclass": lambda: Sub()(x, bad),
        "forward called directly": lambda: before.forward(x, bad),
    }
    with patch():
        for name, call in reached.items():
            assert _outcome(call) is safeloss.TargetOutOfRangeError, name
        assert _outcome(lambda: alias(x, bad)) is IndexError


# ------------------------------------------------------------ fidelity: inputs stock accepts


def _inputs(kind: str) -> tuple[torch.Tensor, torch.Tensor, dict[str, object]]:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 5, generator=g)
    t = torch.randint(0, 5, (6,), generator=g)
    w = torch.rand(5, generator=g) + 0.1
    p = torch.softmax(torch.randn(6, 5, generator=g), dim=1)
    if kind == "all ignored, weight, smoothing":
        return x, torch.full((6,), -100), {"weight": w, "label_smoothing": 0.2}
    if kind == "ignore_index a real class":
        return x, t, {"ignore_index": int(t[0]), "weight": w, "label_smoothing": 0.1}
    if kind == "negative ignore_index other than -100":
        return x, torch.where(t == 0, -7, t), {"ignore_index": -7}
    if kind == "probabilities, weight, smoothing":
        return x, p, {"weight": w, "label_smoothing": 0.3}
    if kind == "4-d, weight, smoothing":
        x4 = torch.randn(2, 5, 3, 4, generator=g).to(memory_format=torch.channels_last)
        t4 = torch.randint(0, 5, (2, 3, 4), generator=g)
        t4[0, 0, 0] = -100
        return x4, t4, {"weight": w, "label_smoothing": 0.1}
    if kind == "4-d probabilities":
        return torch.randn(2, 5, 3, generator=g), torch.softmax(torch.randn(2, 5, 3, generator=g), 1), {}
    if kind == "unbatched":
        return x[0], t[0], {"weight": w}
    if kind == "empty batch":
        return x[:0], t[:0], {}
    if kind == "legacy size_average=False, probabilities":
        return x, p, {"size_average": False}
    if kind == "float16, weight":
        return x.half(), t, {"weight": w.half(), "label_smoothing": 0.1}
    if kind == "bfloat16 probabilities":
        return x.bfloat16(), p.bfloat16(), {}
    if kind == "float64 probabilities, float32 logits":
        return x, p.double(), {}
    raise AssertionError(kind)


_KINDS = ["all ignored, weight, smoothing", "ignore_index a real class",
          "negative ignore_index other than -100", "probabilities, weight, smoothing",
          "4-d, weight, smoothing", "4-d probabilities", "unbatched", "empty batch",
          "legacy size_average=False, probabilities", "float16, weight", "bfloat16 probabilities",
          "float64 probabilities, float32 logits"]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kind", _KINDS)
@pytest.mark.parametrize("api", ["functional", "module"])
def test_patched_values_gradients_and_dtypes_are_stock(api: str, kind: str, reduction: str) -> None:
    x, t, kwargs = _inputs(kind)
    if "size_average" in kwargs and reduction != "mean":
        pytest.skip("legacy arguments override reduction")

    def run(fp64: bool = False) -> tuple[torch.Tensor, ...]:
        def cast(v: torch.Tensor) -> torch.Tensor:
            return v.double() if fp64 and v.is_floating_point() else v

        xi = cast(x.detach().clone()).requires_grad_()
        ti = cast(t.detach().clone()).requires_grad_() if t.is_floating_point() else t
        kw = {k: cast(v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch's legacy-argument warning
            if api == "functional":
                out = F.cross_entropy(xi, ti, reduction=reduction, **kw)  # type: ignore[arg-type]
            else:
                out = torch.nn.CrossEntropyLoss(reduction=reduction, **kw)(xi, ti)  # type: ignore[arg-type]
        inputs = (xi, ti) if ti.requires_grad else (xi,)
        grads = torch.autograd.grad(out.float().sum(), inputs, allow_unused=True)
        return (out.detach(), *grads)

    want, truth = run(), run(fp64=True)
    with patch():
        got = run()
    for ours, stock, exact in zip(got, want, truth):
        assert_matches(ours, stock, exact, what=f"{api} {kind} {reduction}", precision=x.dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_patched_call_under_autocast_is_stock(dtype: torch.dtype) -> None:
    x, t = torch.randn(6, 5), torch.tensor([0, 1, -100, 3, 4, 2])
    truth = F.cross_entropy(x.to(dtype).double(), t, label_smoothing=0.1)
    with torch.autocast("cpu", dtype=dtype):
        want = F.cross_entropy(x.to(dtype), t, label_smoothing=0.1)
        with patch():
            got = F.cross_entropy(x.to(dtype), t, label_smoothing=0.1)
    assert_matches(got, want, truth, what=f"autocast {dtype}")
