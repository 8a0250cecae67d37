"""The workloads of ``safeloss bench``: shapes, presets, inputs, and the bytes each must move."""

from __future__ import annotations

import dataclasses
import math
import zlib

import torch
import torch.nn.functional as F
from torch import Tensor

from .measure import _DTYPES


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    family: str  # classification | llm | segmentation
    shape: tuple[int, ...]  # logits, classes in dim 1
    dtype: str  # key of _DTYPES
    prob: bool = False  # probability targets (the logits' shape) instead of class indices
    label_smoothing: float = 0.0

    @property
    def classes(self) -> int:
        return self.shape[1]

    @property
    def positions(self) -> int:
        return math.prod(self.shape) // self.shape[1]

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def variant(self) -> str:
        if self.prob:
            return "prob-target"
        if self.label_smoothing:
            return f"smooth{self.label_smoothing:g}"
        return "index"

    def logits_bytes(self) -> int:
        return math.prod(self.shape) * self.torch_dtype.itemsize

    def target_bytes(self) -> int:
        return math.prod(self.shape) * self.torch_dtype.itemsize if self.prob else self.positions * 8


def _cls(n: int, c: int, dt: str) -> Workload:
    return Workload(f"cls-N{n}-C{c}-{dt}", "classification", (n, c), dt)


def _llm(n: int, v: int, dt: str, prob: bool = False, eps: float = 0.0) -> Workload:
    tag = "prob-" if prob else f"smooth{eps:g}-" if eps else ""
    return Workload(f"llm-{tag}N{n}-V{v}-{dt}", "llm", (n, v), dt, prob, eps)


def _seg(b: int, c: int, h: int, w: int, dt: str) -> Workload:
    return Workload(f"seg-B{b}-C{c}-{h}x{w}-{dt}", "segmentation", (b, c, h, w), dt)


def full_workloads() -> list[Workload]:
    """The issue's matrix: classification, LLM vocabularies, segmentation, prob / smoothing; bf16 and fp32."""
    out: list[Workload] = []
    for dt in ("bf16", "fp32"):
        out += [_cls(n, c, dt) for n in (256, 4096, 65536) for c in (10, 100, 1000)]
        out += [_llm(n, v, dt) for n in (4096, 8192, 16384) for v in (32000, 128256, 151936, 262144)]
        out += [_seg(8, 21, 512, 512, dt), _seg(8, 150, 512, 512, dt)]
        out += [_llm(8192, 128256, dt, prob=True), _llm(8192, 128256, dt, eps=0.1)]
    return out


def quick_workloads(device: str) -> list[Workload]:
    """Small presets. CUDA: exactly what the GPU targets need, target shapes first, so that one
    run answers them (see benchmarks/README.md). CPU: three class counts at one N, a trend for the
    plots in about a minute on two cores; each is timed long enough to be steady, rather than
    many shapes timed too briefly to trust."""
    if device == "cuda":
        return [
            _llm(8192, 128256, "bf16"),  # the headline target
            _cls(4096, 10, "fp32"), _cls(4096, 100, "fp32"),  # "not slower than stock eager"
            _llm(8192, 32000, "bf16"), _llm(8192, 262144, "bf16"),  # the curve against V
            _llm(8192, 128256, "bf16", eps=0.1), _llm(4096, 128256, "bf16", prob=True),
            _seg(8, 21, 512, 512, "bf16"),
            # the rest of the curve and the other dimensions, one step each
            _llm(8192, 151936, "bf16"), _llm(16384, 128256, "bf16"), _llm(8192, 128256, "fp32"),
            _seg(8, 150, 512, 512, "bf16"), _cls(65536, 1000, "bf16"),
        ]
    # C = 10 is mostly per-call overhead; 32000 an LLM vocabulary (128 MiB of fp32 logits).
    return [_cls(1024, 10, "fp32"), _cls(1024, 1000, "fp32"), _llm(1024, 32000, "fp32")]


def _seed(w: Workload) -> int:
    return zlib.crc32(w.name.encode())


def make_inputs(w: Workload, dev: torch.device, k: int) -> list[tuple[Tensor, Tensor]]:
    """``k`` (logits, target) pairs; the same values for every provider (seeded by the name).

    The logits are an intermediate of an autograd graph, as a model's output is in a training
    step, not a leaf: safeloss's ``inplace_backward`` never overwrites a leaf requiring grad (the
    caller's own tensor), so leaf logits would time its out-of-place path. The graph's leaf is
    a 0-d zero added once here, so no second logits-sized tensor stays alive; the timed
    ``torch.autograd.grad(loss, (x,))`` stops at ``x``."""
    g = torch.Generator(device=dev).manual_seed(_seed(w))
    anchor = torch.zeros((), device=dev, dtype=w.torch_dtype, requires_grad=True)
    out = []
    for _ in range(k):
        x = torch.randn(w.shape, generator=g, device=dev, dtype=torch.float32)
        x = x.to(w.torch_dtype).add(anchor)
        if w.prob:  # valid distributions, so safeloss's probability check stays quiet
            t = torch.randn(w.shape, generator=g, device=dev).softmax(1).to(w.torch_dtype)
        else:
            tshape = (w.shape[0], *w.shape[2:])
            t = torch.randint(0, w.classes, tshape, generator=g, device=dev)
        out.append((x, t))
    return out


def pool_size(w: Workload, dev: torch.device) -> int:
    """Copies to rotate through so the working set is at least twice the last-level cache."""
    per = w.logits_bytes() + w.target_bytes()
    if dev.type == "cuda":
        cache = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 50 << 20)
    else:
        cache = 32 << 20  # a generous L3 share
    return max(1, min(8, math.ceil(2 * cache / per)))


def reference_loss(w: Workload, x: Tensor, t: Tensor) -> float:
    """Mean loss in fp64 from the same inputs, in chunks so that huge logits need no fp64 copy."""
    total = 0.0
    step = max(1, (256 << 20) // (8 * (math.prod(x.shape) // x.shape[0])))
    with torch.no_grad():
        for i in range(0, x.shape[0], step):
            xs = x[i:i + step].double()
            ts = t[i:i + step].double() if w.prob else t[i:i + step]
            total += float(F.cross_entropy(xs, ts, label_smoothing=w.label_smoothing, reduction="sum"))
    return total / w.positions


def must_move_bytes(w: Workload) -> tuple[int, int]:
    """(forward, forward+backward) bytes any implementation must move: read the logits and the
    targets once; fwd+bwd also writes the gradient once (a fused kernel can do exactly that)."""
    x, t = w.logits_bytes(), w.target_bytes()
    return x + t, 2 * x + t


def streamed_bytes(w: Workload) -> int:
    """fwd+bwd bytes of the usual two-kernel design (and of safeloss's kernel for rows too long
    for one block): the forward reads the logits, the backward reads them again and writes the
    gradient; probability targets are read in both."""
    x, t = w.logits_bytes(), w.target_bytes()
    return 3 * x + (2 * t if w.prob else t)
