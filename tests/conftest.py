import contextlib
import os
import warnings
from collections.abc import Callable, Iterator

# Without a GPU, the Triton kernels run through Triton's interpreter on CPU tensors. It must be set
# before triton is first imported, and importing torch may import triton: so before torch.
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
from hypothesis import settings

# CI must be reproducible: the same examples on every run (a failure there is a real, replayable
# bug, never a flaky draw). Locally, hypothesis explores new examples each run.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(autouse=True)
def _fresh_warning_state():
    """Warn-once bookkeeping and the plans of call signatures are global: start every test with
    a clean slate (a test that monkeypatches safeloss internals must not meet a plan made before)."""
    import safeloss
    from safeloss.core import plan

    safeloss.reset_warnings()
    safeloss.set_strict(None)
    plan.clear()
    yield
    safeloss.set_strict(None)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def clean_patch():
    """No safeloss.patch() leaks into or out of a test, and unpatch() restores the very objects."""
    import torch.nn.functional as F

    from safeloss.patch import unpatch

    stock_f, stock_forward = F.cross_entropy, torch.nn.CrossEntropyLoss.__dict__["forward"]
    stock_call = torch.nn.CrossEntropyLoss.__dict__.get("__call__")
    stock_lf = getattr(F, "linear_cross_entropy", None)  # torch >= 2.13
    stock_lcls = getattr(torch.nn, "LinearCrossEntropyLoss", None)
    stock_lforward = stock_lcls and stock_lcls.__dict__["forward"]
    unpatch()
    yield
    unpatch()
    assert F.cross_entropy is stock_f
    assert torch.nn.CrossEntropyLoss.__dict__["forward"] is stock_forward
    assert torch.nn.CrossEntropyLoss.__dict__.get("__call__") is stock_call
    assert getattr(F, "linear_cross_entropy", None) is stock_lf
    assert stock_lcls is None or stock_lcls.__dict__["forward"] is stock_lforward


@pytest.fixture
def benchmark_script():
    """Load a script of benchmarks/ (not a package) as a module: ``benchmark_script("gpu_tune")``."""
    import importlib.util
    from pathlib import Path

    def load(name: str):
        path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture
def one_rank() -> Iterator[None]:
    """A one-rank gloo group in this process (direct calls of the parallel ops, their plans and
    per-call cost); skipped where a process group already exists."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group exists in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.fixture
def autocast_or_skip() -> Callable[[str], contextlib.AbstractContextManager[None]]:
    """``with autocast_or_skip(device):`` autocast for ``device`` (bfloat16 on the CPU), or skip
    the test where this torch build cannot enter it (torch's note that no such device is present
    silenced)."""
    @contextlib.contextmanager
    def enter(device: str) -> Iterator[None]:
        kw = {"dtype": torch.bfloat16} if device == "cpu" else {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's note that no XPU is present
            with torch.autocast(device, **kw):  # type: ignore[arg-type]
                if not torch._C._is_any_autocast_enabled():
                    pytest.skip(f"this torch build cannot enter {device} autocast")
                yield
    return enter
