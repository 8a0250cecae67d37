"""Compile gate for the Triton kernels, without a GPU: every launch configuration the dispatcher can
choose, compiled ahead of time for real GPU targets, with registers, spills and shared memory.

    python benchmarks/aot_gate.py [--quick] [--out DIR] [--targets 80,90,100] [--jobs N]

1. Enumerate. The public calls (``safeloss.cross_entropy`` through ``ce.pipeline.run``,
   ``safeloss.linear_cross_entropy``, the vocab-parallel statistics of ``parallel.vocab``) run,
   forward and backward, over a grid of shapes, dtypes and options on *meta* tensors, with every
   Triton launch (``kernel[grid](...)``) intercepted: Triton's own argument binder turns the
   arguments into the (signature, constexprs, specialization attributes, options) a real launch
   on a CUDA device would compile, and nothing runs. The tile rules, warps and kernel arguments are
   therefore the dispatch code's own: a new kernel, a new constexpr or a changed tile rule shows up
   here without editing this file. Meta tensors stand for CUDA tensors (``triton_unavailable_reason``
   answers None for them; the linear path's chunk size follows its CUDA rule); the pipeline runs
   in its no-host-read mode (``Mode.CAPTURE``), which computes the same launches as an eager call.
2. Compile. Each distinct configuration is compiled with ``triton.compile(ASTSource(...),
   target=GPUTarget("cuda", cc, 32))`` in worker processes without ``TRITON_INTERPRET`` (so this works
   whether the caller set it or not), then its PTX goes through the ``ptxas`` inside the triton
   wheel with ``-v`` (the flags Triton's own ``make_cubin`` uses): registers, spill stores/loads,
   stack frame; shared memory is the compiled kernel's (Triton allocates it dynamically).
3. Judge and write. ``DIR/aot-gate.json`` (one line per configuration: constexprs, dtypes,
   specialisations, the calls that chose it, per-target registers / spills / shared memory) and
   ``DIR/aot-gate.md`` (one line per kernel, constexprs and warps, the worst over its variants,
   with the theoretical occupancy on an H100). Exit status 1 when a configuration fails to
   compile, spills, needs more shared memory than its target allows per block, or breaks its
   register budget (:func:`budget`).

``--quick`` (CI): the same enumeration; every configuration must be in the committed table
(:data:`TABLE`), made from the current kernel code; the configurations nearest their budgets
(and any the table lacks) are compiled for sm_90 and compared with it. Nothing is cached outside
``--out`` except Triton's own kernel cache (``TRITON_CACHE_DIR``). ``--resume FILE`` reuses an
earlier run's results (same Triton, same kernel code) and compiles only what it lacks.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import importlib
import importlib.util
import io
import itertools
import json
import os
import pickle
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `python benchmarks/aot_gate.py` from anywhere imports this checkout
    sys.path.insert(0, ROOT)

# Register budgets (per thread), the limits every launch passes to ptxas (``maxnreg``): rows of
# up to NARROW_C classes are short, the kernel is all latency, and 128 registers keep 16 of the
# 64 warp slots of an SM (25% occupancy) in flight; longer rows the hardware limit, 255.
from safeloss.core._flags import MAX_REGS, NARROW_REGS, max_registers  # noqa: E402
from safeloss.core._flags import NARROW_CLASSES as NARROW_C  # noqa: E402

# Shared memory a block may use, per target (bytes): sm_80 163 KB, sm_90 / sm_100 227 KB.
SMEM_PER_BLOCK = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448, 120: 101376}


@dataclasses.dataclass(frozen=True)
class SM:
    """Per-SM limits for the occupancy column (H100 SXM, sm_90)."""

    regs: int = 65536
    max_warps: int = 64
    max_blocks: int = 32
    smem: int = 233472  # 228 KB per SM
    smem_reserved: int = 1024  # per block, on sm_80 and newer
    reg_unit: int = 256  # registers are allocated per warp in units of 256


H100 = SM()


def occupancy(regs: int, num_warps: int, shared: int, sm: SM = H100) -> float:
    """Theoretical occupancy: resident warps / max warps, limited by registers, warps, blocks, smem."""
    per_warp = -(-max(regs, 1) * 32 // sm.reg_unit) * sm.reg_unit
    by_regs = (sm.regs // per_warp) // num_warps
    by_warps = sm.max_warps // num_warps
    by_smem = sm.smem // (shared + sm.smem_reserved)
    blocks = min(by_regs, by_warps, by_smem, sm.max_blocks)
    return blocks * num_warps / sm.max_warps


# --------------------------------------------------------------------------------------------
# 1. Enumeration
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Launch:
    """One distinct compiled variant of a kernel: what a launch on a CUDA device would compile."""

    module: str
    name: str
    signature: dict[str, str]  # argument -> Triton type ("*bf16", "i32", "constexpr", ...)
    constexprs: dict[tuple[int, ...], Any]  # argument path -> value (declared ones and ==1 specialisations)
    attrs: dict[tuple[int, ...], Any]  # argument path -> specialisation attributes (divisibility by 16)
    options: dict[str, Any]  # launch keyword options (num_warps, num_stages, ...)
    declared: tuple[str, ...] = ()  # the kernel's own tl.constexpr parameters
    cases: list[str] = dataclasses.field(default_factory=list)  # the calls that chose it
    max_classes: int = 0  # widest row (classes) of a call that chose it
    min_classes: int = 1 << 62  # narrowest

    @functools.cached_property
    def key(self) -> str:
        """A stable id of the compiled variant (the same launch -> the same key, across runs)."""
        text = repr((self.module, self.name, sorted(self.signature.items()),
                     sorted((k, _plain(v)) for k, v in self.constexprs.items()),
                     sorted((k, str(v)) for k, v in self.attrs.items()), sorted(self.options.items())))
        return hashlib.sha1(text.encode()).hexdigest()[:16]

    def own_constexprs(self) -> dict[str, Any]:
        """The kernel's declared constexprs and their values (what the tile rule and options chose)."""
        names = list(self.signature)
        vals = {names[p[0]]: _plain(v) for p, v in self.constexprs.items()}
        return {k: vals[k] for k in self.declared if k in vals}

    def label(self) -> str:
        return " ".join(f"{k}={_short(v)}" for k, v in self.own_constexprs().items())

    def dtypes(self) -> dict[str, str]:
        """Pointer arguments -> element type."""
        return {k.removesuffix("_ptr"): v.lstrip("*") for k, v in self.signature.items() if v.startswith("*")}

    def data_dtype(self) -> str:
        """The element type of the first tensor argument (the logits, or the gradient)."""
        return next(iter(self.dtypes().values()), "-")

    def specialisation(self) -> str:
        """Triton's value specialisations of the launch: integer arguments equal to 1 (compiled as
        constants) and integer arguments divisible by 16 (aligned accesses)."""
        names = list(self.signature)
        ones = [k for k, v in self.signature.items() if v == "constexpr" and k not in self.declared]
        div = [names[p[0]] for p, a in self.attrs.items()
               if a and not self.signature[names[p[0]]].startswith("*")]
        return f"=1: {','.join(ones) or '-'}; %16: {','.join(div) or '-'}"

    def workloads(self) -> list[str]:
        """The grid's workloads (shape names) whose calls chose it."""
        return sorted({workload(c) for c in self.cases})

    def tile(self) -> int:
        c = self.own_constexprs()
        return int(c.get("BLOCK_P", 1) or 1) * int(c.get("BLOCK_C", 1) or 1)

    @property
    def num_warps(self) -> int:
        return int(self.options.get("num_warps", 4))


def workload(case: str) -> str:
    """The shape name of a case ("ce cls-N4096-C10 bfloat16 index train" -> "cls-N4096-C10")."""
    parts = case.split()
    return parts[1] if len(parts) > 1 else case


def _plain(v: Any) -> Any:
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    return str(v).replace("triton.language.", "")


def _short(v: Any) -> str:
    return {True: "T", False: "F"}.get(v, str(v)) if isinstance(v, bool) else str(v)


class Recorder:
    """Intercepts every Triton kernel launch (compiled or interpreted kernels alike) and records
    what a CUDA launch would compile, instead of running it."""

    def __init__(self) -> None:
        self.launches: dict[str, Launch] = {}
        self.case = "?"
        self.classes = 0
        self._backend: Any = None
        # id(kernel) -> (kernel, its JITFunction, Triton's argument binder for a CUDA target)
        self._binders: dict[int, tuple[Any, Any, Callable[..., Any]]] = {}

    def _binder(self, kernel: Any) -> tuple[Any, Callable[..., Any]]:
        """The JITFunction behind ``kernel`` and its binder (interpreted kernels: a JITFunction of
        the same source, used for its binder only; it is never compiled in this process)."""
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        from triton.runtime.jit import JITFunction, create_function_from_signature

        got = self._binders.get(id(kernel))
        if got is None:
            if self._backend is None:
                self._backend = make_backend(GPUTarget("cuda", 90, 32))
            if isinstance(kernel, JITFunction):
                jit = kernel
            else:
                kw = {k: v for k, v in getattr(kernel, "kwargs", {}).items()
                      if k in ("do_not_specialize", "do_not_specialize_on_alignment")}
                jit = JITFunction(kernel.fn, **kw)
            got = (kernel, jit, create_function_from_signature(jit.signature, jit.params, self._backend))
            self._binders[id(kernel)] = got
        return got[1], got[2]

    def record(self, kernel: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        jit, binder = self._binder(kernel)
        launch_kw = dict(kwargs)
        launch_kw.setdefault("debug", False)
        bound, spec, opts = binder(*args, **launch_kw)
        _options, signature, constexprs, attrs = jit._pack_args(self._backend, launch_kw, bound, spec, opts)
        options = {k: v for k, v in opts.items() if k != "debug" or v}
        fn = jit.fn
        declared = tuple(p.name for p in jit.params if p.is_constexpr)
        launch = Launch(fn.__module__, fn.__qualname__, dict(signature), dict(constexprs), dict(attrs), options,
                        declared)
        launch = self.launches.setdefault(launch.key, launch)
        if self.case not in launch.cases:
            launch.cases.append(self.case)
        launch.max_classes = max(launch.max_classes, self.classes)
        launch.min_classes = min(launch.min_classes, self.classes)

    @contextlib.contextmanager
    def active(self) -> Iterator[Recorder]:
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction

        rec = self

        def run(self: Any, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> None:
            rec.record(self, args, kwargs)

        saved = JITFunction.run, InterpretedFunction.run
        JITFunction.run = InterpretedFunction.run = run  # type: ignore[method-assign]
        try:
            yield self
        finally:
            JITFunction.run, InterpretedFunction.run = saved  # type: ignore[method-assign]


@contextlib.contextmanager
def meta_is_cuda() -> Iterator[None]:
    """Meta tensors stand for CUDA tensors: the backend choice says Triton can run on them, and the
    linear path cuts its chunks by its CUDA memory plan (``chunked.plan``, which every cut goes
    through) with half-precision operands kept as they are (as on CUDA: no fp32 copies)."""
    from safeloss.backends import dispatch
    from safeloss.linear import chunked

    reason, plan = dispatch.triton_unavailable_reason, chunked.plan

    def unavailable(device: Any) -> str | None:
        return None if getattr(device, "type", device) == "meta" else reason(device)

    def cuda_plan(*args: Any, device_type: str, **kwargs: Any) -> Any:
        return plan(*args, device_type="cuda" if device_type == "meta" else device_type, **kwargs)

    half = chunked.HALF_OPERANDS_ON_CPU
    dispatch.triton_unavailable_reason, chunked.plan, chunked.HALF_OPERANDS_ON_CPU = unavailable, cuda_plan, True
    try:
        yield
    finally:
        dispatch.triton_unavailable_reason, chunked.plan, chunked.HALF_OPERANDS_ON_CPU = reason, plan, half


# The grid. Shapes are (name, logits shape, layout); layouts: "rows" (class dim contiguous when it
# is the last dim, i.e. (N, C) or (C,)), "nchw" (class dim 1, positions contiguous), "cl"
# (channels-last: class stride 1), "bvt" ((B, V, T) view of (B, T, V) logits: class stride 1).
FULL_SHAPES: list[tuple[str, tuple[int, ...], str]] = [
    ("llm-N8192-V128256", (8192, 128256), "rows"),
    ("llm-N8192-V50257", (8192, 50257), "rows"),  # a vocabulary not divisible by 16
    ("llm-N16384-V262144", (16384, 262144), "rows"),  # 2^32 logits: past int32 offsets
    ("llm-bvt-B4-T2048-V128256", (4, 128256, 2048), "bvt"),
    ("llm-row-V32000", (32000,), "rows"),
    *[(f"cols-N4096-C{c}", (4096, c), "rows") for c in (1024, 2048, 4096, 8192, 16384, 32768)],
    *[(f"cls-N4096-C{c}", (4096, c), "rows") for c in (2, 10, 100, 1000)],
    ("cls-N8-C10", (8, 10), "rows"),
    ("cls-N4095-C37", (4095, 37), "rows"),  # nothing divisible by 16
    ("seg-B8-C21-512x512", (8, 21, 512, 512), "nchw"),
    ("seg-B8-C150-512x512", (8, 150, 512, 512), "nchw"),
    ("seg-B16-C10-7x7", (16, 10, 7, 7), "nchw"),
    ("seg-B8-C1000-64x64", (8, 1000, 64, 64), "nchw"),
    ("seg-cl-B8-C21-512x512", (8, 21, 512, 512), "cl"),
    ("vol-B2-C4-64x128x128", (2, 4, 64, 128, 128), "nchw"),
    ("seq-B16-C100-T1000", (16, 100, 1000), "nchw"),
    # Past int32 offsets (I64 variants): rows of each width above (2^32 logits), narrow rows of
    # the multi-position tiles.
    *[(f"cols-N{2**32 // c}-C{c}", (2**32 // c, c), "rows") for c in (1024, 2048, 4096, 8192, 16384, 32768)],
    ("seg-B16-C19-2048x4096", (16, 19, 2048, 4096), "nchw"),
    ("cls-N268435456-C10", (268435456, 10), "rows"),
    ("cls-N4194304-C1000", (4194304, 1000), "rows"),
]
DTYPES = ("float32", "bfloat16", "float16")
# (name, label_smoothing, class weight, probability targets, target requires grad)
TARGETS = [
    ("index", 0.0, False, False, False),
    ("index-smooth", 0.1, False, False, False),
    ("index-weight", 0.0, True, False, False),
    ("index-weight-smooth", 0.1, True, False, False),
    ("prob", 0.0, False, True, False),
    ("prob-weight-smooth", 0.1, True, True, False),
    ("prob-dtarget", 0.0, False, True, True),
    ("prob-weight-dtarget", 0.0, True, True, True),
]
# (name, requires grad, inplace_backward, fused_grad, reduction)
MODES = [
    ("inference", False, False, False, "mean"),
    ("train", True, False, False, "mean"),
    ("train-none", True, False, False, "none"),  # a per-position upstream gradient
    ("inplace", True, True, False, "mean"),
    ("fused", True, False, True, "sum"),
    ("fused-none", True, False, True, "none"),
]
# float16 compiles the code of bfloat16 with another conversion: a subset of shapes and options.
FP16_SHAPES = ("llm-N8192-V128256", "cols-N4096-C4096", "cls-N4096-C10", "cls-N4095-C37", "seg-B8-C21-512x512")
FP16_TARGETS = ("index", "index-weight-smooth", "prob-dtarget")
FP16_MODES = ("inference", "train", "fused")
LINEAR = [  # (name, N, H, C): LM heads (the linear-CE tile), and a small classifier head
    ("lin-N8192-H4096-V128256", 8192, 4096, 128256),
    ("lin-N4096-H2048-V32000", 4096, 2048, 32000),
    ("lin-N4096-H512-C1000", 4096, 512, 1000),
    ("lin-N4096-H256-C10", 4096, 256, 10),
]
# The LLM / RL extras (issue 18) through their own entry (``ce.extras.run``): every combination of
# the four options (the default one aside), on a shape of each tile class and offset width, so the
# kernels' extras constexprs (XFORM, ZLOSS, STATS) meet every tile, target and mode they can.
EXTRAS = [
    {k: v for k, v in zip(("softcap", "temperature", "z_loss", "return_stats"), combo)}
    for combo in itertools.product((None, 30.0), (1.0, 0.7), (0.0, 1e-4), (False, True))
][1:]
DEFAULT_EXTRAS = dict(softcap=None, temperature=1.0, z_loss=0.0, return_stats=False)
EXTRAS_SHAPES = ("llm-N8192-V128256", "llm-N8192-V50257", "llm-N16384-V262144", "llm-bvt-B4-T2048-V128256",
                 "cols-N4096-C1024", "cols-N4096-C16384", "cls-N4096-C10", "cls-N4096-C100", "cls-N4095-C37",
                 "seg-B8-C21-512x512", "seg-B8-C150-512x512", "seg-cl-B8-C21-512x512",
                 "seg-B16-C19-2048x4096", "cls-N268435456-C10")
EXTRAS_DTYPES = ("float32", "bfloat16")
EXTRAS_TARGETS = ("index", "index-weight-smooth", "prob-weight-smooth", "prob-dtarget")
EXTRAS_MODES = ("inference", "train", "train-none")
VOCAB = [  # vocab-parallel slices: (name, rows, local classes)
    ("vp-N8192-V128256-tp8", 8192, 128256 // 8),
    ("vp-N8192-V262144-tp2", 8192, 262144 // 2),
    ("vp-N8192-V50257-tp4", 8192, 50257 // 4 + 1),
    ("vp-N4096-V1000-tp4", 4096, 250),
    ("vp-seg-B8-C21-64x64-tp1", 8 * 64 * 64, 21),
]


def _logits(shape: tuple[int, ...], layout: str, dtype: Any, grad: bool) -> Any:
    import torch

    if layout == "cl":
        x = torch.empty(shape, device="meta", dtype=dtype).to(memory_format=torch.channels_last)
    elif layout == "bvt":
        b, v, t = shape
        x = torch.empty((b, t, v), device="meta", dtype=dtype).transpose(1, 2)
    else:
        x = torch.empty(shape, device="meta", dtype=dtype)
    return x.detach().requires_grad_(grad)


def _ce_case(shape: tuple[int, ...], layout: str, dtype: Any, target: tuple, mode: tuple, ignore_index: int) -> None:
    import torch

    from safeloss.ce import pipeline
    from safeloss.core.mode import Mode

    _tn, eps, has_w, prob, dtarget = target
    _mn, grad, inplace, fused, reduction = mode
    x, t, w = _ce_operands(shape, layout, dtype, grad, has_w, prob, dtarget)
    out = pipeline.run(Mode.CAPTURE, x, t, w, ignore_index, reduction, eps, strict=None, backend="triton",
                       inplace_backward=inplace, fused_grad=fused, owner=None)
    if grad:
        out.backward(torch.ones(out.shape, device="meta", dtype=out.dtype))


def _ce_operands(shape: tuple[int, ...], layout: str, dtype: Any, grad: bool, has_w: bool, prob: bool,
                 dtarget: bool) -> tuple[Any, Any, Any]:
    """Meta logits, targets (class indices or probabilities) and class weights of a case."""
    import torch

    x = _logits(shape, layout, dtype, grad)
    C = shape[0] if len(shape) == 1 else shape[1]
    if prob:
        t = torch.empty(x.shape, device="meta", dtype=dtype).requires_grad_(dtarget and grad)
    else:
        pos = () if len(shape) == 1 else (shape[0], *shape[2:])
        t = torch.empty(pos, device="meta", dtype=torch.int64)
    w = torch.empty((C,), device="meta", dtype=torch.float32) if has_w else None
    return x, t, w


def _ce_extras_case(shape: tuple[int, ...], layout: str, dtype: Any, target: tuple, mode: tuple, ignore_index: int,
                    extras: dict[str, Any]) -> None:
    import torch

    from safeloss.ce import extras as ce_extras
    from safeloss.core import extras as X
    from safeloss.core.mode import Mode

    _tn, eps, has_w, prob, dtarget = target
    _mn, grad, _inplace, _fused, reduction = mode
    x, t, w = _ce_operands(shape, layout, dtype, grad, has_w, prob, dtarget)
    out = ce_extras.run(Mode.CAPTURE, x, t, w, ignore_index, reduction, eps, X.check(**extras), strict=None,
                        owner=None, backend="triton")
    out = out[0] if isinstance(out, tuple) else out
    if grad:
        out.backward(torch.ones(out.shape, device="meta", dtype=out.dtype))


def _linear_case(n: int, h: int, c: int, dtype: Any, eps: float, has_w: bool, reduction: str) -> None:
    import torch

    from safeloss.core.mode import Mode
    from safeloss.linear import api as linear_api

    x = torch.empty((n, h), device="meta", dtype=dtype, requires_grad=True)
    lw = torch.empty((c, h), device="meta", dtype=dtype, requires_grad=True)
    t = torch.empty((n,), device="meta", dtype=torch.int64)
    w = torch.empty((c,), device="meta", dtype=torch.float32) if has_w else None
    # The entry sends meta tensors to stock's reference path (shapes only); the call a CUDA
    # graph capture makes (no host reads) runs the chunk loop and its Triton tile, as on a GPU.
    out = linear_api.run(Mode.CAPTURE, x, lw, t, None, w, reduction, -100, eps, strict=None,
                         backend="triton", owner=None)
    out.backward(torch.ones(out.shape, device="meta", dtype=out.dtype))


def _linear_extras_case(n: int, h: int, c: int, dtype: Any, eps: float, has_w: bool, reduction: str,
                        extras: dict[str, Any]) -> None:
    import torch

    from safeloss.core import extras as X
    from safeloss.core.mode import Mode
    from safeloss.linear import extras as linear_extras

    x = torch.empty((n, h), device="meta", dtype=dtype, requires_grad=True)
    lw = torch.empty((c, h), device="meta", dtype=dtype, requires_grad=True)
    t = torch.empty((n,), device="meta", dtype=torch.int64)
    w = torch.empty((c,), device="meta", dtype=torch.float32) if has_w else None
    out = linear_extras.run(Mode.CAPTURE, x, lw, t, None, w, reduction, -100, eps, X.check(**extras), strict=None,
                            owner=None, backend="triton")
    out = out[0] if isinstance(out, tuple) else out
    out.backward(torch.ones(out.shape, device="meta", dtype=out.dtype))


def _vocab_case(rows: int, c_local: int, dtype: Any, eps: float, has_w: bool,
                extras: dict[str, Any] | None = None) -> None:
    import types

    import torch

    from safeloss.core import extras as X
    from safeloss.parallel import vocab

    x = torch.empty((rows, c_local), device="meta", dtype=dtype)
    w = torch.empty((c_local,), device="meta", dtype=torch.float32) if has_w else None
    ex = None if extras is None else X.check(*(extras[k] for k in DEFAULT_EXTRAS), op="vocab_parallel_cross_entropy")
    plan = types.SimpleNamespace(backend="triton", w_local=w, eps=eps, ex=ex, acc=torch.float32)
    vocab._local_stats(vocab._rows(x), plan)  # type: ignore[arg-type]


def cases() -> Iterator[tuple[str, int, Callable[[], None]]]:
    """(case name, classes per row, the call) over the grid."""
    import torch

    dtypes = DTYPES
    for (sname, shape, layout), dt in itertools.product(FULL_SHAPES, dtypes):
        dtype = getattr(torch, dt)
        C = shape[0] if len(shape) == 1 else shape[1]
        for target, mode in itertools.product(TARGETS, MODES):
            if target[4] and not mode[1]:
                continue  # d/dtarget needs a backward
            if dt == "float16" and (sname not in FP16_SHAPES or target[0] not in FP16_TARGETS
                                    or mode[0] not in FP16_MODES):
                continue
            # Segmentation labels usually skip 255; probability targets take no ignore_index.
            ignore = 255 if layout != "rows" and not target[3] else -100
            name = f"ce {sname} {dt} {target[0]} {mode[0]}"
            yield name, C, functools.partial(_ce_case, shape, layout, dtype, target, mode, ignore)
    shapes = {s[0]: s for s in FULL_SHAPES}
    targets, modes = {x[0]: x for x in TARGETS}, {x[0]: x for x in MODES}
    for sname, dt, tn, mn, extras in itertools.product(EXTRAS_SHAPES, EXTRAS_DTYPES, EXTRAS_TARGETS, EXTRAS_MODES,
                                                       EXTRAS):
        _sn, shape, layout = shapes[sname]
        target, mode = targets[tn], modes[mn]
        if target[4] and not mode[1]:
            continue
        ignore = 255 if layout != "rows" and not target[3] else -100
        opts = ",".join(f"{k}={v}" for k, v in extras.items() if v != DEFAULT_EXTRAS[k])
        name = f"extras {sname} {dt} {tn} {mn} {opts}"
        yield name, shape[0] if len(shape) == 1 else shape[1], functools.partial(
            _ce_extras_case, shape, layout, getattr(torch, dt), target, mode, ignore, extras)
    for (lname, n, h, c), dt in itertools.product(LINEAR, dtypes):
        for eps, has_w, red in ((0.0, False, "mean"), (0.1, True, "mean"), (0.0, False, "none")):
            name = f"linear {lname} {dt} eps={eps} weight={has_w} {red}"
            yield name, c, functools.partial(_linear_case, n, h, c, getattr(torch, dt), eps, has_w, red)
    for (lname, n, h, c), dt, (eps, has_w, red), extras in itertools.product(
            LINEAR, EXTRAS_DTYPES, ((0.0, False, "mean"), (0.1, True, "mean"), (0.0, False, "none")), EXTRAS):
        opts = ",".join(f"{k}={v}" for k, v in extras.items() if v != DEFAULT_EXTRAS[k])
        name = f"extras-linear {lname} {dt} eps={eps} weight={has_w} {red} {opts}"
        yield name, c, functools.partial(_linear_extras_case, n, h, c, getattr(torch, dt), eps, has_w, red, extras)
    for (vname, rows, c_local), dt in itertools.product(VOCAB, dtypes):
        for eps, has_w in ((0.0, False), (0.0, True), (0.1, False), (0.1, True)):
            name = f"vocab-parallel {vname} {dt} eps={eps} weight={has_w}"
            yield name, c_local, functools.partial(_vocab_case, rows, c_local, getattr(torch, dt), eps, has_w)
    for (vname, rows, c_local), dt, (eps, has_w), extras in itertools.product(
            VOCAB, EXTRAS_DTYPES, ((0.0, False), (0.1, True)), EXTRAS):
        opts = ",".join(f"{k}={v}" for k, v in extras.items() if v != DEFAULT_EXTRAS[k])
        name = f"extras-vocab-parallel {vname} {dt} eps={eps} weight={has_w} {opts}"
        yield name, c_local, functools.partial(_vocab_case, rows, c_local, getattr(torch, dt), eps, has_w, extras)


def enumerate_launches(only: Callable[[str], bool] | None = None) -> tuple[list[Launch], int]:
    """Every distinct launch configuration the dispatch code chooses over the grid (``only``: the
    cases whose name it accepts), and the number of calls made."""
    import warnings

    rec = Recorder()
    errors = []
    n = 0
    with rec.active(), meta_is_cuda(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, classes, call in cases():
            if only is not None and not only(name):
                continue
            n += 1
            rec.case, rec.classes = name, classes
            try:
                call()
            except Exception as e:  # a call the grid makes must run: the gate fails on it
                errors.append(f"{name}: {type(e).__name__}: {e}")
    if errors:
        raise RuntimeError("enumeration: calls failed on meta tensors:\n" + "\n".join(errors[:20]))
    return sorted(rec.launches.values(), key=lambda launch: (launch.name, launch.label(), launch.key)), n


# --------------------------------------------------------------------------------------------
# 2. Ahead-of-time compilation (worker processes, never the interpreter)
# --------------------------------------------------------------------------------------------
_PTXAS_LINE = re.compile(r"Used (\d+) registers")
_SPILL_LINE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def _parse_ptxas(log: str) -> dict[str, int] | None:
    regs = _PTXAS_LINE.search(log)
    spill = _SPILL_LINE.search(log)
    if regs is None or spill is None:
        return None
    return {"regs": int(regs.group(1)), "stack": int(spill.group(1)),
            "spill_stores": int(spill.group(2)), "spill_loads": int(spill.group(3))}


def _ptxas_stats(ptx: str, cc: int, opts: Any) -> dict[str, int]:
    """Run the wheel's ptxas with -v on ``ptx`` (the flags of Triton's own make_cubin) and parse it."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    ptxas = get_ptxas(cc).path
    fmad = [] if opts.enable_fp_fusion else ["--fmad=false"]
    extra = opts.ptx_options.split(" ") if opts.ptx_options else []
    with tempfile.TemporaryDirectory(prefix="aot-gate-") as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [ptxas, "-lineinfo", *fmad, "-v", "--regAllocOptLevel=2", *extra,
               f"--gpu-name={sm_arch_from_capability(cc)}", src, "-o", src + ".o"]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    log = res.stdout + res.stderr
    if res.returncode != 0:
        raise RuntimeError(f"ptxas failed ({res.returncode}): {log[-2000:]}")
    stats = _parse_ptxas(log)
    if stats is None:
        raise RuntimeError(f"unexpected ptxas -v output: {log[-2000:]}")
    return stats


def compile_one(launch: Launch, cc: int) -> dict[str, Any]:
    """Compile ``launch`` for sm_``cc``; registers, spills, shared memory, or the error."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    t0 = time.perf_counter()
    out: dict[str, Any] = {"cc": cc}
    try:
        fn = getattr(importlib.import_module(launch.module), launch.name)
        if type(fn).__name__ != "JITFunction":
            raise RuntimeError(f"{launch.module}.{launch.name} is a {type(fn).__name__} (TRITON_INTERPRET set?)")
        target = GPUTarget("cuda", cc, 32)
        opts = make_backend(target).parse_options(dict(launch.options, debug=launch.options.get("debug", False)))
        src = ASTSource(fn, launch.signature, launch.constexprs, launch.attrs)
        # Triton's own ptxas run already has -v: keep its report (printed with this knob). A
        # kernel from Triton's cache was not assembled now: then ptxas runs again on its PTX.
        log = io.StringIO()
        knob = triton.knobs.nvidia.dump_ptxas_log
        triton.knobs.nvidia.dump_ptxas_log = True
        try:
            with contextlib.redirect_stdout(log):
                kernel = triton.compile(src, target=target, options=opts.__dict__)
        finally:
            triton.knobs.nvidia.dump_ptxas_log = knob
        stats = _parse_ptxas(log.getvalue())
        out.update(stats if stats is not None else _ptxas_stats(kernel.asm["ptx"], cc, opts))
        out["shared"] = int(kernel.metadata.shared)
        out["num_warps"] = int(kernel.metadata.num_warps)
        out["num_stages"] = int(kernel.metadata.num_stages)
        out["ok"] = True
    except Exception as e:  # the verdict reports it; the other configurations go on
        out["ok"] = False
        out["error"] = f"{type(e).__name__}: {str(e)[-1500:]}"
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out


def _worker(job_file: str) -> None:
    """Compile the jobs whose indices arrive on stdin, one JSON line out per job."""
    import warnings

    warnings.simplefilter("ignore")  # Triton's knob notices; the results are the output
    with open(job_file, "rb") as f:
        jobs: list[tuple[Launch, int]] = pickle.load(f)
    for line in sys.stdin:
        i = int(line)
        launch, cc = jobs[i]
        res = compile_one(launch, cc)
        res["job"] = i
        sys.stdout.write(json.dumps(res) + "\n")
        sys.stdout.flush()


def compile_all(launches: list[Launch], targets: list[int], jobs: int | None = None,
                progress: Callable[[int, int], None] | None = None) -> list[list[dict[str, Any]]]:
    """Results per launch (one dict per target, in ``targets`` order), compiled by ``jobs`` worker
    processes that do not inherit TRITON_INTERPRET."""
    import queue
    import threading

    work = [(launch, cc) for launch in launches for cc in targets]
    results: list[dict[str, Any] | None] = [None] * len(work)
    if not work:
        return []
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(work)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its notice
    todo: queue.Queue[int] = queue.Queue()
    # Widest tiles first: the slowest compiles start early, the short ones fill the gaps.
    order = sorted(range(len(work)), key=lambda i: -work[i][0].tile() * (2 if work[i][1] >= 100 else 1))
    for i in order:
        todo.put(i)
    done = [0]
    lock = threading.Lock()
    with tempfile.TemporaryDirectory(prefix="aot-gate-") as d:
        job_file = os.path.join(d, "jobs.pkl")
        with open(job_file, "wb") as f:
            pickle.dump(work, f)

        def start() -> subprocess.Popen[str]:
            return subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", job_file],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)

        def run_worker() -> None:
            # A worker that dies (a crash in the compiler, a signal) is replaced and its job retried
            # once; a job that kills two workers is a failed configuration, never a silent pass.
            proc = start()
            tries: dict[int, int] = {}
            try:
                while True:
                    try:
                        i = todo.get_nowait()
                    except queue.Empty:
                        break
                    assert proc.stdin is not None and proc.stdout is not None
                    try:
                        proc.stdin.write(f"{i}\n")
                        proc.stdin.flush()
                        line = proc.stdout.readline()
                    except OSError:  # the worker is gone (broken pipe)
                        line = ""
                    if not line:
                        rc = proc.wait()
                        tries[i] = tries.get(i, 0) + 1
                        if tries[i] < 2:
                            todo.put(i)
                        else:
                            results[i] = {"cc": work[i][1], "ok": False, "seconds": 0,
                                          "error": f"the compile worker died twice on it (exit status {rc})"}
                        proc = start()
                        continue
                    res = json.loads(line)
                    res.pop("job", None)
                    results[i] = res
                    with lock:
                        done[0] += 1
                        if progress is not None:
                            progress(done[0], len(work))
            finally:
                if proc.stdin is not None:
                    proc.stdin.close()
                proc.wait()

        threads = [threading.Thread(target=run_worker) for _ in range(jobs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for i, r in enumerate(results):  # left over by a dead worker: say so, never pass silently
        if r is None:
            results[i] = {"cc": work[i][1], "ok": False, "error": "not compiled (worker died)", "seconds": 0}
    per = len(targets)
    return [[results[i * per + j] for j in range(per)] for i in range(len(launches))]  # type: ignore[misc]


# --------------------------------------------------------------------------------------------
# 3. Verdicts, the table, the quick form
# --------------------------------------------------------------------------------------------
TABLE = os.path.join(ROOT, "benchmarks", "results", "aot-gate", "aot-gate.json")
BEFORE = os.path.join(ROOT, "benchmarks", "results", "aot-gate", "before", "aot-gate.json")  # a1ecd1a's code
QUICK_PER_KERNEL = 10  # the quick form compiles this many configurations per kernel, the riskiest
QUICK_NEW = 40  # and at most this many that the committed table does not know


def budget(launch: Launch) -> int:
    """Register budget per thread: NARROW_REGS when a call with rows of at most NARROW_C classes
    chose this configuration, else the hardware limit; at most what a block of its warps can
    hold in an SM's register file (the limit the launcher passes to ptxas, ``max_registers``)."""
    return max_registers(launch.min_classes, launch.num_warps)


def verdicts(launch: Launch, results: list[dict[str, Any]]) -> list[str]:
    """Why this configuration fails the gate (empty: it passes)."""
    bad = []
    for r in results:
        cc = r["cc"]
        if not r.get("ok"):
            bad.append(f"sm_{cc}: does not compile: {r.get('error', '?')[:400]}")
            continue
        if r["spill_stores"] or r["spill_loads"]:
            bad.append(f"sm_{cc}: spills ({r['spill_stores']} bytes stored, {r['spill_loads']} loaded)")
        limit = SMEM_PER_BLOCK.get(cc)
        if limit is not None and r["shared"] > limit:
            bad.append(f"sm_{cc}: {r['shared']} bytes of shared memory, the target has {limit}")
        if occupancy(r["regs"], launch.num_warps, r["shared"]) == 0:
            bad.append(f"sm_{cc}: does not launch: {r['regs']} registers x {32 * launch.num_warps} threads "
                       f"or {r['shared']} bytes of shared memory exceed an SM")
        if r["regs"] > budget(launch):
            bad.append(f"sm_{cc}: {r['regs']} registers per thread, budget {budget(launch)} "
                       f"(chosen for rows of {launch.min_classes} classes)")
    return bad


def describe(launch: Launch) -> str:
    return (f"{launch.name} [{launch.label()}] warps={launch.num_warps} {launch.data_dtype()} "
            f"({launch.specialisation()}; e.g. {launch.cases[0] if launch.cases else '?'})")


def source_hashes(launches: list[Launch]) -> dict[str, str]:
    """A hash of each kernel module's code (comments and docstrings do not count): the committed
    table is stale when one changes."""
    import ast

    out = {}
    for mod in sorted({launch.module for launch in launches}):
        path = importlib.util.find_spec(mod).origin  # type: ignore[union-attr]
        with open(path) as f:  # type: ignore[arg-type]
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                    and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
                body[0] = ast.Pass()
        out[mod] = hashlib.sha1(ast.dump(tree).encode()).hexdigest()[:16]
    return out


def row(launch: Launch, results: list[dict[str, Any]]) -> dict[str, Any]:
    """The JSON row of one configuration."""
    h = next((r for r in results if r["cc"] == 90 and r.get("ok")), None)
    return {
        "key": launch.key, "kernel": launch.name, "module": launch.module,
        "constexprs": launch.own_constexprs(), "options": launch.options, "dtypes": launch.dtypes(),
        "data_dtype": launch.data_dtype(),
        "specialisation": launch.specialisation(), "classes": [launch.min_classes, launch.max_classes],
        "register_budget": budget(launch), "n_cases": len(launch.cases), "cases": launch.cases[:4],
        "workloads": launch.workloads(),
        "results": {str(r["cc"]): {k: v for k, v in r.items() if k != "cc"} for r in results},
        "h100_occupancy": None if h is None else occupancy(h["regs"], h["num_warps"], h["shared"]),
        "failures": verdicts(launch, results),
    }


def workload_classes() -> dict[str, int]:
    """Classes per row of each workload of the grid."""
    out = {name: shape[0] if len(shape) == 1 else shape[1] for name, shape, _layout in FULL_SHAPES}
    out.update({name: c for name, _n, _h, c in LINEAR})
    out.update({name: c for name, _rows, c in VOCAB})
    return out


def before_after(rows: list[dict[str, Any]], before: dict[str, Any]) -> list[str]:
    """Markdown: per narrow-row workload and kernel, the most sm_90 registers per thread over the
    configurations its calls chose (every dtype and option) and the H100 occupancy they allow,
    in ``before`` (an earlier table) and now."""
    classes = workload_classes()

    def per(rs: list[dict[str, Any]]) -> dict[tuple[str, str], tuple[int, float, int]]:
        out: dict[tuple[str, str], tuple[int, float, int]] = {}
        for r in rs:
            res = r["results"].get("90", {})
            if not res.get("ok"):
                continue
            occ = occupancy(res["regs"], res["num_warps"], res["shared"])
            for w in r.get("workloads", []):
                regs, low, n = out.get((w, r["kernel"]), (0, 1.0, 0))
                out[(w, r["kernel"])] = (max(regs, res["regs"]), min(low, occ), n + 1)
        return out

    def narrow(rs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [r for r in rs if r["classes"][0] <= NARROW_C and r["results"].get("90", {}).get("ok")]

    now, was = per(rows), per(before["configurations"])
    keys = sorted((k for k in now.keys() | was.keys() if classes.get(k[0], NARROW_C + 1) <= NARROW_C),
                  key=lambda k: (classes[k[0]], k))
    nb, na = narrow(before["configurations"]), narrow(rows)

    def worst(rs: list[dict[str, Any]]) -> str:
        if not rs:
            return "no narrow-row configuration"
        regs = [r["results"]["90"]["regs"] for r in rs]
        occ = min(r["h100_occupancy"] for r in rs)
        over = sum(x > NARROW_REGS for x in regs)
        return f"at most {max(regs)} registers, {over} of {len(rs)} over {NARROW_REGS}, occupancy {occ:.1%} or more"

    def cell(v: tuple[int, float, int] | None) -> str:
        return "- | - | -" if v is None else f"{v[0]} | {v[1]:.1%} | {v[2]}"

    lines = [
        "", f"## Narrow rows (up to {NARROW_C} classes): before and after (sm_90)", "",
        f"Before: commit {before['meta'].get('commit', '?')} ({before['meta'].get('triton', '?')}; "
        f"`before/`), the same grid. Configurations chosen for rows of up to {NARROW_C} classes: "
        f"before {worst(nb)}; now {worst(na)}.", "",
        "Per workload and kernel: the most registers per thread over the configurations its calls "
        "chose (every dtype and option), the H100 theoretical occupancy that allows (the lowest), "
        "and how many configurations.", "",
        "| workload | C | kernel | before regs | before occ | before n | now regs | now occ | now n |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {w} | {classes[w]} | {k} | {cell(was.get((w, k)))} | {cell(now.get((w, k)))} |" for w, k in keys]
    return lines


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any], before: dict[str, Any] | None = None) -> str:
    """One line per kernel, constexprs and warps: the worst over its dtypes and specialisations;
    with ``before`` (an earlier table), the narrow rows' registers then and now."""
    targets = meta["targets"]
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for r in rows:
        cx = " ".join(f"{k}={_short(v)}" for k, v in r["constexprs"].items())
        groups.setdefault((r["kernel"], cx, r["options"].get("num_warps", 4)), []).append(r)
    n_fail = sum(1 for r in rows if r["failures"])
    lines = [
        "# Ahead-of-time compile gate",
        "",
        f"`python benchmarks/aot_gate.py` on {meta['triton']}, torch {meta['torch']}, commit {meta['commit']}: "
        f"{meta['n_cases']} calls enumerated on meta tensors, {len(rows)} distinct compiled configurations "
        f"(kernel, constexprs, warps, argument types and Triton's value specialisations) of "
        f"{len({r['kernel'] for r in rows})} kernels, compiled for {', '.join(f'sm_{t}' for t in targets)} "
        f"({meta['compile_seconds']} s).",
        "",
        f"**{'PASS' if not n_fail else 'FAIL'}**: {n_fail} configurations fail. Budgets: compiles, no spills, "
        f"shared memory within the target, at most {NARROW_REGS} registers per thread for every "
        f"configuration chosen for rows of up to {NARROW_C} classes ({MAX_REGS} otherwise, and never more "
        "than a block of its warps can hold in an SM's 65536 registers: 128 at 16 warps); every "
        "launch passes that budget to ptxas as its register limit (`maxnreg`).",
        "",
        "One line per kernel, constexprs and warps; `n` counts its compiled variants (`dtype`: of the "
        "logits, or of the gradient for ce_scale_kernel; "
        "other argument types, strides equal to 1, divisibility by 16) and each number is the worst "
        "over them. `regs`: registers per thread per target; `spill`: bytes spilled (stores + loads, "
        "any target); `smem`: shared memory in bytes (sm_90); `occ`: theoretical occupancy on an H100 "
        "(sm_90 registers and shared memory; 65536 registers, 64 warps, 32 blocks, 228 KB per SM); "
        "`C`: classes per row of the calls that chose it; `budget`: registers allowed.",
        "",
        "| kernel | constexprs | warps | dtype | n | C | " + " | ".join(f"regs sm_{t}" for t in targets)
        + " | spill | smem | occ | budget | verdict |",
        "|---|---|---|---|---|---|" + "---|" * len(targets) + "---|---|---|---|---|",
    ]
    for (kernel, cx, warps), rs in sorted(groups.items()):
        res = [x for r in rs for x in r["results"].values()]
        regs = []
        for t in targets:
            vals = [r["results"].get(str(t), {}).get("regs") for r in rs]
            regs.append("fail" if any(v is None for v in vals) else str(max(vals)))  # type: ignore[type-var]
        spill = max((x["spill_stores"] + x["spill_loads"] for x in res if x.get("ok")), default=0)
        smem = max((r["results"].get("90", {}).get("shared", 0) for r in rs), default=0)
        occ = [r["h100_occupancy"] for r in rs if r["h100_occupancy"] is not None]
        xs = sorted({r["data_dtype"] for r in rs})
        c = f"{min(r['classes'][0] for r in rs)}-{max(r['classes'][1] for r in rs)}"
        ok = not any(r["failures"] for r in rs)
        lines.append(
            f"| {kernel} | {cx} | {warps} | {','.join(xs)} | {len(rs)} | {c} | " + " | ".join(regs)
            + f" | {spill} | {smem} | {f'{min(occ):.0%}' if occ else '-'} | "
            + f"{min(r['register_budget'] for r in rs)} | {'ok' if ok else '**FAIL**'} |"
        )
    fails = [(r, f) for r in rows for f in r["failures"]]
    if fails:
        lines += ["", f"## Failures ({len(fails)})", ""]
        lines += [f"- {r['kernel']} [{' '.join(f'{k}={_short(v)}' for k, v in r['constexprs'].items())}] "
                  f"warps={r['options'].get('num_warps')} {r['data_dtype']} ({r['specialisation']}; "
                  f"e.g. {r['cases'][0] if r['cases'] else '?'}): {f}" for r, f in fails[:300]]
    if before is not None:
        lines += before_after(rows, before)
    return "\n".join(lines) + "\n"


def write(out: str, rows: list[dict[str, Any]], meta: dict[str, Any], before: dict[str, Any] | None = None) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "aot-gate.json"), "w") as f:  # one configuration per line: diffable
        f.write('{"meta": ' + json.dumps(meta, sort_keys=True) + ',\n "configurations": [\n')
        f.write(",\n".join(json.dumps(r, sort_keys=True) for r in rows))
        f.write("\n]}\n")
    with open(os.path.join(out, "aot-gate.md"), "w") as f:
        f.write(markdown(rows, meta, before))


def load_table(path: str) -> dict[str, Any] | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def quick_selection(launches: list[Launch], known: dict[str, dict[str, Any]]) -> list[Launch]:
    """The configurations the quick form compiles: per kernel, those nearest their register budget
    in the committed table (the widest tiles when it has none), and every configuration the table
    does not know (up to QUICK_NEW)."""
    pick: dict[str, Launch] = {}
    by_kernel: dict[str, list[Launch]] = {}
    for launch in launches:
        by_kernel.setdefault(launch.name, []).append(launch)

    def pressure(launch: Launch) -> float:
        r = known.get(launch.key, {}).get("results", {}).get("90", {})
        return r.get("regs", 0) / budget(launch) + 10 * (r.get("spill_stores", 0) > 0)

    for ls in by_kernel.values():
        for launch in sorted(ls, key=lambda x: (-pressure(x), -x.tile(), x.key))[:QUICK_PER_KERNEL]:
            pick[launch.key] = launch
    for launch in [x for x in launches if x.key not in known][:QUICK_NEW]:
        pick[launch.key] = launch
    return list(pick.values())


def _resumable(path: str, meta: dict[str, Any], targets: list[int]) -> dict[str, dict[int, dict[str, Any]]]:
    """Results of an earlier run that this run may reuse, per configuration and target: same
    Triton, same kernel code, no worker death (compile errors are kept: they are results). A
    target the earlier run did not compile is compiled now (targets can be added in stages)."""
    table = load_table(path)
    if table is None or table["meta"].get("triton") != meta["triton"]:
        print(f"--resume {path}: another Triton; compiling everything")
        return {}
    old = table["meta"].get("sources", {})
    changed = sorted(m for m, h in meta["sources"].items() if old.get(m) != h)
    if changed:  # per kernel module: the others' results stay valid
        print(f"--resume {path}: other kernel code in {', '.join(changed)}; compiling its configurations")
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for r in table["configurations"]:
        if r["module"] in changed:
            continue
        res = {t: dict(r["results"][str(t)], cc=t) for t in targets if str(t) in r["results"]}
        res = {t: x for t, x in res.items() if "worker died" not in x.get("error", "")}
        if res:
            out[r["key"]] = res
    return out


def _meta(targets: list[int], launches: list[Launch], n_cases: int) -> dict[str, Any]:
    import torch
    import triton

    try:
        commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=False).stdout.strip() or "?"
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no", "--", "safeloss"],
                               capture_output=True, text=True, check=False).stdout.strip()
        commit += " + local changes" if dirty else ""
    except OSError:
        commit = "?"
    return {"targets": targets, "triton": f"triton {triton.__version__}", "torch": torch.__version__,
            "commit": commit, "n_cases": n_cases, "n_configurations": len(launches),
            "sources": source_hashes(launches), "budgets": {"narrow_classes": NARROW_C,
                                                            "narrow_registers": NARROW_REGS}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="the CI form: check the committed table covers every configuration, compile the "
                    "riskiest for sm_90 and compare")
    ap.add_argument("--out", default=None, help="write aot-gate.json / aot-gate.md into this folder")
    ap.add_argument("--targets", default=None, help="compute capabilities (default 80,90,100; 90 with --quick)")
    ap.add_argument("--jobs", type=int, default=None, help="compile processes (default: the CPU count)")
    ap.add_argument("--table", default=TABLE, help="the committed table the quick form checks against")
    ap.add_argument("--before", default=BEFORE, help="an earlier table: the markdown compares its narrow-row "
                    "registers with this run's (default: the committed before/ table)")
    ap.add_argument("--resume", default=None, help="an earlier aot-gate.json of the same kernel code and "
                    "Triton: reuse its results, compile only what it lacks")
    ap.add_argument("--only", default=None, help="a regular expression: only the calls whose case name it "
                    "matches (e.g. '^extras ' for the LLM / RL extras), for a partial run")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        _worker(a.worker)
        return 0
    targets = [int(t) for t in a.targets.split(",")] if a.targets else ([90] if a.quick else [80, 90, 100])
    t0 = time.perf_counter()
    only = re.compile(a.only) if a.only else None
    launches, n_cases = enumerate_launches(None if only is None else lambda name: bool(only.search(name)))
    meta = _meta(targets, launches, n_cases)
    if a.only:
        meta["only"] = a.only
    print(f"enumerated {n_cases} calls: {len(launches)} distinct configurations of "
          f"{len({x.name for x in launches})} kernels ({time.perf_counter() - t0:.0f} s)", flush=True)
    problems: list[str] = []
    todo = launches
    known: dict[str, dict[str, Any]] = {}
    if a.quick:
        table = load_table(a.table)
        if table is None:
            print(f"no committed table at {a.table}: compiling the widest tiles only")
        elif table["meta"].get("triton") != meta["triton"]:
            print(f"the committed table is from {table['meta'].get('triton')}, this is {meta['triton']}: "
                  "coverage and registers not compared, budgets checked on what is compiled")
        else:
            known = {r["key"]: r for r in table["configurations"]}
            changed = [m for m, h in meta["sources"].items() if table["meta"].get("sources", {}).get(m) != h]
            if changed:
                problems.append(f"kernel code changed since the committed table ({', '.join(changed)})")
                known = {k: r for k, r in known.items() if r["module"] not in changed}
            new = [x for x in launches if x.key not in known]
            if new:
                problems.append(f"{len(new)} configurations are not in the committed table, e.g. "
                                + "; ".join(describe(x) for x in new[:5]))
        todo = quick_selection(launches, known)
    t1 = time.perf_counter()
    print(f"compiling {len(todo)} configurations for {', '.join(f'sm_{t}' for t in targets)} "
          f"({a.jobs or os.cpu_count()} processes)", flush=True)
    step = max(1, len(todo) * len(targets) // 10)

    def progress(done: int, total: int) -> None:
        if done % step == 0 or done == total:
            print(f"  {done}/{total} ({time.perf_counter() - t1:.0f} s)", flush=True)

    reused = _resumable(a.resume, meta, targets) if a.resume else {}
    keys = {x.key for x in todo}
    got: dict[tuple[str, int], dict[str, Any]] = {(k, t): r for k, rs in reused.items() if k in keys
                                                  for t, r in rs.items()}
    if reused:
        print(f"reusing {len(got)} of {len(todo) * len(targets)} compiles from {a.resume}", flush=True)
    for cc in targets:  # per target: the configurations it still lacks
        fresh = [x for x in todo if (x.key, cc) not in got]
        for x, (r,) in zip(fresh, compile_all(fresh, [cc], a.jobs, progress)):
            got[x.key, cc] = r
    results = [[got[x.key, cc] for cc in targets] for x in todo]
    meta["compile_seconds"] = round(time.perf_counter() - t1)
    rows = [row(x, r) for x, r in zip(todo, results)]
    # The quick form fails on what the committed table does not already record: a failure the
    # full run recorded there (open work, listed in the table's markdown) is printed as KNOWN and
    # does not fail CI again; a new one, or one the table no longer explains, fails.
    failures, known_failures = [], []
    for x, r in zip(todo, rows):
        for f in r["failures"]:
            recorded = a.quick and f in known.get(x.key, {}).get("failures", [])
            (known_failures if recorded else failures).append(f"{describe(x)}: {f}")
    for x, r in zip(todo, rows):  # the same compiler must give the table's numbers
        old = known.get(x.key, {}).get("results", {})
        for cc, got in r["results"].items():
            was = old.get(cc)
            if was is not None and got.get("ok") and was.get("regs") != got.get("regs"):
                problems.append(f"{describe(x)}: sm_{cc} {got['regs']} registers, the table says {was['regs']}")
    if problems:
        problems.append("regenerate the table: python benchmarks/aot_gate.py --out benchmarks/results/aot-gate")
    if a.out:
        before = load_table(a.before) if a.before and os.path.abspath(a.before) != os.path.abspath(
            os.path.join(a.out, "aot-gate.json")) else None
        write(a.out, rows, meta, before)
        print(f"wrote {a.out}/aot-gate.md and {a.out}/aot-gate.json")
    for line in known_failures[:40]:
        print("KNOWN", line)
    for line in failures[:40] + problems:
        print("FAIL", line)
    ok = not failures and not problems
    recorded = f", {len(known_failures)} known (in the committed table)" if known_failures else ""
    print(f"{'PASS' if ok else 'FAIL'}: {len(todo)} of {len(launches)} configurations compiled for "
          f"{len(targets)} targets, {len(failures)} budget failures{recorded}, {len(problems)} table problems "
          f"({time.perf_counter() - t0:.0f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
