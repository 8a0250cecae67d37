"""safeloss.patch() beyond torch: third-party cross-entropy losses it routes (Hugging Face's
LabelSmoother, timm's LabelSmoothingCrossEntropy and SoftTargetCrossEntropy), compared with the
libraries' own code on real inputs; and the cost of entering and leaving patch()."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import time
import types
import warnings
from pathlib import Path

import pytest
import torch

import safeloss
from safeloss.patch import thirdparty
from tests.tolerances import assert_matches

sp = importlib.import_module("safeloss.patch")
pytestmark = pytest.mark.usefixtures("clean_patch")


@pytest.fixture(autouse=True)
def _routes_restored():
    yield
    for route in thirdparty.ROUTES:
        assert route.installed is None, route.name
    assert thirdparty._finder not in sys.meta_path


# ------------------------------------------------------------------ Hugging Face LabelSmoother

trainer_pt_utils = pytest.importorskip("transformers.trainer_pt_utils")
LabelSmoother = trainer_pt_utils.LabelSmoother
ORIGINAL_CALL = LabelSmoother.__dict__["__call__"]


def _lm_batch(dtype: torch.dtype, shape: tuple[int, ...] = (3, 6, 11), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(*shape, generator=g).to(dtype)
    labels = torch.randint(0, shape[-1], shape[:-1], generator=g)
    labels[..., -2:] = -100  # right padding
    return logits, labels


def _run(fn, logits: torch.Tensor, *args, **kwargs):
    x = logits.clone().requires_grad_()
    out = fn({"logits": x}, *args, **kwargs)
    out.backward()
    return out.detach(), x.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("count", [None, 7, "tensor"])
@pytest.mark.parametrize("eps, ignore_index", [(0.1, -100), (0.0, -100), (1.0, -100), (0.2, 0)])
def test_label_smoother_values_and_grads_equal_the_original(dtype, shift, count, eps, ignore_index):
    logits, labels = _lm_batch(dtype)
    labels[labels == -100] = ignore_index
    n = torch.tensor(7) if count == "tensor" else count
    smoother = LabelSmoother(epsilon=eps, ignore_index=ignore_index)
    want = _run(smoother, logits, labels, shift_labels=shift, num_items_in_batch=n)
    truth = _run(smoother, logits.double(), labels, shift_labels=shift, num_items_in_batch=n)
    with safeloss.patch():
        assert type(smoother).__call__ is not ORIGINAL_CALL  # routed
        got = _run(smoother, logits, labels, shift_labels=shift, num_items_in_batch=n)
    assert got[0].dtype == want[0].dtype  # float32 for half logits, as the original
    # The original sums its smoothing term in float32 whatever the logits' dtype.
    precision = torch.float32 if dtype == torch.float64 else dtype
    assert_matches(got[0], want[0], truth[0], "loss", precision)
    assert_matches(got[1], want[1], truth[1], "grad", precision)


@pytest.mark.parametrize("shape", [(5, 9), (2, 3, 4, 9)])
def test_label_smoother_other_ranks_and_a_trailing_label_dim(shape):
    logits, labels = _lm_batch(torch.float64, shape)
    smoother = LabelSmoother()
    for lab in (labels, labels.unsqueeze(-1)):
        want = _run(smoother, logits, lab)
        with safeloss.patch():
            got = _run(smoother, logits, lab)
        torch.testing.assert_close(got, want)


def test_label_smoother_model_output_as_a_tuple_and_an_hf_output():
    from transformers.modeling_outputs import CausalLMOutput

    logits, labels = _lm_batch(torch.float32)
    smoother = LabelSmoother()
    want = smoother((logits,), labels)
    with safeloss.patch():
        torch.testing.assert_close(smoother((logits,), labels), want)
        torch.testing.assert_close(smoother(CausalLMOutput(logits=logits), labels), want)


def test_label_smoother_bad_label_raises_safelosss_error_naming_the_route():
    logits, labels = _lm_batch(torch.float32)
    labels[2, 3] = 11  # == vocabulary size
    smoother = LabelSmoother()
    with pytest.raises(RuntimeError, match="out of bounds"):
        smoother({"logits": logits}, labels, shift_labels=True)  # the original: torch.gather's error
    with safeloss.patch(), pytest.raises(safeloss.TargetOutOfRangeError, match=r"outside the class range 0\.\.10") as e:
        smoother({"logits": logits}, labels, shift_labels=True)
    msg = str(e.value)
    assert "transformers' LabelSmoother, reached through safeloss.patch()" in msg
    assert "after its shift by one" in msg
    # an `except RuntimeError` written for the original's gather error still catches it
    assert isinstance(e.value, RuntimeError) and isinstance(e.value, IndexError)


def test_label_smoother_negative_label_is_an_error_not_class_0():
    """The original clamps labels to >= 0, so -1 silently trains class 0; routed, it is reported."""
    logits, labels = _lm_batch(torch.float32)
    labels[1, 1] = -1
    smoother = LabelSmoother()
    smoother({"logits": logits}, labels)  # the original: no error
    with safeloss.patch(), pytest.raises(safeloss.TargetOutOfRangeError, match="Every bad value is -1"):
        smoother({"logits": logits}, labels)


@pytest.mark.parametrize("case", ["epsilon>1", "float labels", "shape mismatch", "int logits"])
def test_label_smoother_calls_it_does_not_understand_run_the_original(case, monkeypatch):
    logits, labels = _lm_batch(torch.float32)
    smoother = LabelSmoother()
    if case == "epsilon>1":
        smoother = LabelSmoother(epsilon=1.5)
    elif case == "float labels":
        labels = labels.clamp(min=0).float()
    elif case == "shape mismatch":
        labels = labels[:, :1]  # broadcasts in the original's gather
    else:
        logits = logits.long()

    def run() -> object:
        try:
            return smoother({"logits": logits}, labels)
        except Exception as e:  # the original's own error, if any
            return type(e)

    want = run()
    called: list[object] = []
    monkeypatch.setattr(thirdparty, "_safe_ce", lambda *a, **k: called.append(a))
    with safeloss.patch():
        got = run()
    assert not called
    if isinstance(want, torch.Tensor):
        torch.testing.assert_close(got, want)
    else:
        assert got is want


def test_label_smoother_strict_and_warnings_follow_the_patch():
    logits, labels = _lm_batch(torch.float32)
    probs = logits.softmax(-1)
    smoother = LabelSmoother()
    with safeloss.patch(strict=True), pytest.raises(safeloss.InputError, match="looks already softmaxed"):
        smoother({"logits": probs}, labels)
    with safeloss.patch(), pytest.warns(safeloss.SafeLossWarning, match="looks already softmaxed"):
        smoother({"logits": probs}, labels)


def test_an_escaped_bound_method_runs_the_original_after_unpatch(monkeypatch):
    logits, labels = _lm_batch(torch.float32)
    smoother = LabelSmoother()
    with safeloss.patch():
        kept = type(smoother).__call__
    called: list[object] = []
    monkeypatch.setattr(thirdparty, "_safe_ce", lambda *a, **k: called.append(a))
    torch.testing.assert_close(kept(smoother, {"logits": logits}, labels), smoother({"logits": logits}, labels))
    assert not called
    assert LabelSmoother.__dict__["__call__"] is ORIGINAL_CALL


# ------------------------------------------------------------------ timm


def _timm_loss_module() -> types.ModuleType:
    """timm's own ``timm.loss.cross_entropy``. timm's package imports torchvision, which PyPI builds
    for CUDA torch only; where ``import timm`` fails for that reason, the module file of the
    installed timm is loaded under its own name (its code, unchanged: it imports only torch)."""
    try:
        return importlib.import_module("timm.loss.cross_entropy")
    except ImportError:
        pass
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("timm is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "loss" / "cross_entropy.py"
    if not path.exists():
        pytest.skip(f"timm has no {path.name} in this version")
    mod_spec = importlib.util.spec_from_file_location("timm.loss.cross_entropy", path)
    assert mod_spec is not None and mod_spec.loader is not None
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module


@pytest.fixture
def timm_loss(monkeypatch):
    module = sys.modules.get("timm.loss.cross_entropy") or _timm_loss_module()
    monkeypatch.setitem(sys.modules, "timm.loss.cross_entropy", module)
    return module


def _grad_run(loss: torch.nn.Module, x: torch.Tensor, t: torch.Tensor):
    xi = x.clone().requires_grad_()
    out = loss(xi, t)
    out.backward()
    return out.detach(), xi.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.5])
def test_timm_label_smoothing_values_and_grads_equal_timm(timm_loss, dtype, smoothing):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 10, generator=g).to(dtype)
    t = torch.randint(0, 10, (16,), generator=g)
    loss = timm_loss.LabelSmoothingCrossEntropy(smoothing=smoothing)
    want, truth = _grad_run(loss, x, t), _grad_run(loss, x.double(), t)
    with safeloss.patch():
        assert thirdparty.reached().count("timm.loss.cross_entropy.LabelSmoothingCrossEntropy.forward") == 1
        got = _grad_run(loss, x, t)
    assert_matches(got[0], want[0], truth[0], "loss")
    assert_matches(got[1], want[1], truth[1], "grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", [(16, 10), (4, 3, 10), (10,)])
def test_timm_soft_target_values_and_grads_equal_timm(timm_loss, dtype, shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g).to(dtype)
    # mixup-style targets: a mix of two smoothed one-hot rows
    t = (0.7 * torch.randn(*shape, generator=g).mul(5).softmax(-1) + 0.3 / shape[-1]).to(dtype)
    loss = timm_loss.SoftTargetCrossEntropy()
    want, truth = _grad_run(loss, x, t), _grad_run(loss, x.double(), t.double())
    with safeloss.patch():
        got = _grad_run(loss, x, t)
    assert_matches(got[0], want[0], truth[0], "loss")
    assert_matches(got[1], want[1], truth[1], "grad")


def test_timm_bad_labels_raise_with_no_ignore_index(timm_loss):
    x = torch.randn(4, 5)
    loss = timm_loss.LabelSmoothingCrossEntropy()
    with safeloss.patch():
        with pytest.raises(safeloss.TargetOutOfRangeError, match=r"bad values: 5 at \[2\]") as e:
            loss(x, torch.tensor([0, 1, 5, 2]))
        assert "timm's LabelSmoothingCrossEntropy, reached through safeloss.patch()" in str(e.value)
        # -100 is no label to skip for timm (its gather fails on it): reported, never skipped
        with pytest.raises(safeloss.TargetOutOfRangeError, match="-100") as e:
            loss(x, torch.tensor([0, -100, 1, 2]))
        assert "no ignore_index" in str(e.value) and str(thirdparty.NO_IGNORE) not in str(e.value)


def test_timm_soft_targets_that_are_not_distributions_warn(timm_loss):
    x = torch.randn(4, 5)
    with safeloss.patch(), pytest.warns(safeloss.SafeLossWarning, match="not probability distributions"):
        timm_loss.SoftTargetCrossEntropy()(x, torch.rand(4, 5) * 3)


def test_timm_loss_in_a_scripted_model_compiles(timm_loss):
    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.loss = timm_loss.LabelSmoothingCrossEntropy(0.1)
            self.soft = timm_loss.SoftTargetCrossEntropy()

        def forward(self, x: torch.Tensor, t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
            return self.loss(x, t) + self.soft(x, p)

    x, t, p = torch.randn(4, 5), torch.tensor([0, 1, 4, 2]), torch.randn(4, 5).softmax(-1)
    with safeloss.patch():
        scripted = torch.jit.script(Model())
        torch.testing.assert_close(scripted(x, t, p), Model()(x, t, p))


def test_timm_loss_under_torch_compile(timm_loss):
    torch._dynamo.reset()
    loss = timm_loss.LabelSmoothingCrossEntropy(0.1)
    x, t = torch.randn(4, 5), torch.tensor([0, 1, 4, 2])
    with safeloss.patch():
        compiled = torch.compile(loss, backend="eager", fullgraph=True)
        torch.testing.assert_close(compiled(x, t), loss(x, t))
        with pytest.raises(safeloss.TargetOutOfRangeError, match="outside the class range"):
            compiled(x, torch.tensor([0, 1, 9, 2]))


# ------------------------------------------------------------------ installing routes


def _fake_library(tmp_path: Path, monkeypatch, name: str, body: str) -> thirdparty.Route:
    """A route for a module ``name`` written to tmp_path (importable, not imported yet)."""
    (tmp_path / f"{name}.py").write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    route = thirdparty.Route(
        name, "SmoothCE", "forward", "a test library's SmoothCE", params=[("self", "x", "target")],
        replacement=thirdparty._timm_forward(thirdparty._timm_smoothing_loss, "smoothing"),
        selftest=thirdparty._timm_selftest(thirdparty._timm_smoothing_loss, soft=False),
        note="a test route",
    )
    monkeypatch.setattr(thirdparty, "ROUTES", [route])
    monkeypatch.setattr(thirdparty, "_WATCHED", {name})
    monkeypatch.delitem(sys.modules, name, raising=False)
    return route


_SMOOTH_CE = """
import torch
import torch.nn.functional as F

class SmoothCE(torch.nn.Module):
    def __init__(self, smoothing=0.1):
        super().__init__()
        self.smoothing, self.confidence = smoothing, 1.0 - smoothing

    def forward(self, x, target):
        return F.cross_entropy(x, target, label_smoothing=self.smoothing, reduction="none").mean(){extra}
"""


def test_a_library_imported_while_patched_is_routed(tmp_path, monkeypatch):
    route = _fake_library(tmp_path, monkeypatch, "fake_smooth_lib", _SMOOTH_CE.format(extra=""))
    with safeloss.patch():
        lib = importlib.import_module("fake_smooth_lib")
        assert route.installed is not None and lib.SmoothCE.forward is route.installed[2]
        assert lib.__loader__.__class__.__name__ != "_Loader"  # no trace of the finder
        with pytest.raises(safeloss.TargetOutOfRangeError):
            lib.SmoothCE()(torch.randn(2, 3), torch.tensor([0, 3]))
    assert route.installed is None and lib.SmoothCE.forward.__qualname__ == "SmoothCE.forward"
    sys.modules.pop("fake_smooth_lib", None)


@pytest.mark.parametrize("change", ["missing class", "new parameter", "other values"])
def test_an_upstream_change_warns_once_and_leaves_the_library_alone(tmp_path, monkeypatch, change):
    body = _SMOOTH_CE.format(extra=" * 2" if change == "other values" else "")
    if change == "missing class":
        body = body.replace("class SmoothCE", "class Renamed")
    elif change == "new parameter":
        body = body.replace("def forward(self, x, target)", "def forward(self, x, target, mask=None)")
    route = _fake_library(tmp_path, monkeypatch, "fake_changed_lib", body)
    monkeypatch.setattr(thirdparty, "_warned", set())
    lib = importlib.import_module("fake_changed_lib")
    cls = lib.Renamed if change == "missing class" else lib.SmoothCE
    before = dict(vars(cls))
    with pytest.warns(safeloss.SafeLossWarning, match=r"leaves a test library's SmoothCE .* as it is") as w, \
            safeloss.patch():
        pass
    assert len(w) == 1 and route.installed is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with safeloss.patch():  # the second time: silent
            pass
    assert dict(vars(cls)) == before
    sys.modules.pop("fake_changed_lib", None)


# ------------------------------------------------------------------ the cost of patch()


def test_entering_patch_does_not_look_at_old_modules_again():
    """Each module is looked at once: entering and leaving patch() walks only modules imported
    since the last time, so its cost does not grow with len(sys.modules)."""
    index = sp._modules
    with safeloss.patch():
        pass
    fakes = {f"fake_mod_{i}": types.ModuleType(f"fake_mod_{i}") for i in range(5000)}
    sys.modules.update(fakes)
    try:
        walks, looked = index.full_walks, index.looked
        with safeloss.patch():
            pass
        assert index.looked - looked == len(fakes) and index.full_walks == walks
        looked = index.looked
        for _ in range(3):
            with safeloss.patch():
                pass
        assert index.looked == looked and index.full_walks == walks
        # and the timing: well under a millisecond with 5,000 more modules (a loose bound)
        times = []
        for _ in range(50):
            t0 = time.perf_counter()
            with safeloss.patch():
                pass
            times.append(time.perf_counter() - t0)
        assert sorted(times)[len(times) // 2] < 1e-3
    finally:
        for k in fakes:
            sys.modules.pop(k, None)


def test_a_module_still_being_imported_is_looked_at_again():
    """A script that calls patch() at its top, then imports cross_entropy by name: it was in
    sys.modules, without the name, when patch() first looked at it."""
    mod = types.ModuleType("fake_client_mid_import")
    mod.__spec__ = importlib.machinery.ModuleSpec(mod.__name__, None)
    mod.__spec__._initializing = True  # type: ignore[attr-defined]
    sys.modules[mod.__name__] = mod
    try:
        with safeloss.patch():
            exec("from torch.nn.functional import cross_entropy\n", mod.__dict__)
            assert mod.cross_entropy is sp.cross_entropy  # looked up on the patched module
        assert mod.cross_entropy is torch.nn.functional.cross_entropy  # restored at exit
        mod.__spec__._initializing = False  # type: ignore[attr-defined]
        with safeloss.patch():
            assert mod.cross_entropy is sp.cross_entropy  # rebound: a holder now
    finally:
        del sys.modules[mod.__name__]


def test_a_removed_anchor_module_falls_back_to_one_whole_walk():
    index = sp._modules
    with safeloss.patch():
        pass
    name = index._anchor[0]
    saved = sys.modules.pop(name)
    try:
        walks = index.full_walks
        with safeloss.patch():
            pass
        assert index.full_walks == walks + 1
    finally:
        sys.modules[name] = saved


def test_patch_before_the_library_is_imported_reaches_it():
    """The usual script: ``safeloss.patch()`` at the top, Transformers imported after it."""
    import subprocess

    code = (
        "import safeloss, torch\n"
        "safeloss.patch()\n"
        "from transformers.trainer_pt_utils import LabelSmoother\n"
        "try:\n"
        "    LabelSmoother()({'logits': torch.randn(2, 3, 5)}, torch.tensor([[0, 1, 5], [1, 2, 3]]))\n"
        "except safeloss.TargetOutOfRangeError as e:\n"
        "    print('reached', type(e).__name__)\n"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root,
                         env={**__import__("os").environ, "PYTHONPATH": str(root)}, timeout=120)
    assert out.stdout.strip() == "reached TargetOutOfRangeError", out.stderr[-2000:]
