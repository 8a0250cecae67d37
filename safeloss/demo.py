"""``safeloss demo``: each classic cross-entropy mistake, what stock torch does, what safeloss says.

Every case runs for real, on CPU, in a second: the stock column is whatever
``torch.nn.functional.cross_entropy`` printed or returned, the safeloss column whatever
``safeloss.cross_entropy`` raised or warned.
"""

from __future__ import annotations

import math
import shutil
import textwrap
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Case:
    name: str
    title: str
    make: Callable[[], tuple[tuple, dict]]  # -> (positional args, keyword args) for both calls
    note: str = ""  # one line of context printed under the title
    op: str = "cross_entropy"  # or "linear_cross_entropy": which stock and safeloss function run


def _g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _bad_view():
    feats = torch.randn(2, 4, 5, generator=_g())  # 2 samples of 4 timesteps
    return (feats.view(-1, 5), torch.tensor([1, 3])), {}


def _partial_batch():
    x = torch.randn(100, 10, generator=_g())
    with torch.random.fork_rng():  # a deterministic model without touching the caller's RNG
        torch.manual_seed(0)
        model = torch.nn.Linear(10, 10)
    last = x[96:]  # DataLoader(batch_size=32) without drop_last: the last batch has 4 samples
    return (model(last).detach(), torch.randint(0, 10, (4,), generator=_g(1))), {}


def _softmax_first():
    logits = torch.randn(8, 10, generator=_g()) * 3
    return (logits.softmax(dim=1), torch.randint(0, 10, (8,), generator=_g(1))), {}


def _float_onehot():
    y = torch.randint(0, 10, (8,), generator=_g(1))
    return (torch.randn(8, 10, generator=_g()), F.one_hot(y, 10).float()), {}


def _int_onehot():
    y = torch.randint(0, 10, (8,), generator=_g(1))
    return (torch.randn(8, 10, generator=_g()), F.one_hot(y, 10)), {}


def _n1_target():
    return (torch.randn(6, 4, generator=_g()), torch.randint(0, 4, (6, 1), generator=_g(1))), {}


def _one_based():
    return (torch.randn(10, 5, generator=_g()), torch.tensor([1, 2, 3, 4, 5, 1, 2, 3, 4, 5])), {}


def _ntc():
    return (torch.randn(2, 7, 5, generator=_g()), torch.randint(0, 5, (2, 7), generator=_g(1))), {}


def _ntc_square():
    return (torch.randn(2, 5, 5, generator=_g()), torch.randint(0, 5, (2, 5), generator=_g(1))), {}


def _nhwc():
    return (torch.randn(2, 8, 8, 5, generator=_g()), torch.randint(0, 5, (2, 8, 8), generator=_g(1))), {}


def _mask_255():
    t = torch.randint(0, 3, (2, 4, 4), generator=_g(1))
    t[0, 0, :2] = 255
    return (torch.randn(2, 3, 4, 4, generator=_g()), t), {}


def _float_labels():
    return (torch.randn(4, 3, generator=_g()), torch.tensor([0.0, 2.0, 1.0, 2.0])), {}


def _unnormalized_probs():
    return (torch.randn(4, 3, generator=_g()), torch.tensor([[2.0, 1, 0], [0, 3, 1], [1, 1, 1], [0, 0, 5]])), {}


def _nan_logits():
    x = torch.randn(6, 4, generator=_g())
    x[3, 1] = math.nan
    return (x, torch.randint(0, 4, (6,), generator=_g(1))), {}


def _all_ignored():
    return (torch.randn(4, 50, generator=_g()), torch.full((4,), -100)), {}


def _weight_len():
    return (torch.randn(4, 5, generator=_g()), torch.randint(0, 5, (4,), generator=_g(1))), {"weight": torch.ones(4)}


def _weight_dtype():
    return (torch.randn(4, 5, generator=_g()), torch.randint(0, 5, (4,), generator=_g(1))), {"weight": torch.ones(5, dtype=torch.float64)}


def _negative_smoothing():
    return (torch.randn(4, 5, generator=_g()), torch.randint(0, 5, (4,), generator=_g(1))), {"label_smoothing": -0.1}


def _bad_reduction():
    return (torch.randn(4, 5, generator=_g()), torch.randint(0, 5, (4,), generator=_g(1))), {"reduction": "avg"}


def _single_output():
    return (torch.randn(4, 1, generator=_g()), torch.tensor([0, 1, 1, 0])), {}


CASES = [
    Case("article-partial-batch", "Article claim 1: the partial last batch is a 'batch size mismatch'", _partial_batch,
         "100 samples, batch_size=32: the last batch has 4. The article adds drop_last=True; nothing was wrong."),
    Case("bad-view", "The real batch-size mismatch: a view folded time into the batch", _bad_view,
         "features (2, 4, 5) -> x.view(-1, 5) gives 8 rows for 2 labels."),
    Case("article-softmax", "Article claim 2: 'add nn.Softmax before CrossEntropyLoss'", _softmax_first,
         "CrossEntropyLoss applies log-softmax itself; a softmax first is a silent training bug."),
    Case("article-onehot", "Article claim 3: 'one-hot targets throw an error'", _float_onehot,
         "Float one-hot targets are valid class probabilities since torch 1.10: same loss as indices."),
    Case("int-onehot", "Integer one-hot targets (F.one_hot output, int64)", _int_onehot),
    Case("n1-target", "Targets of shape (N, 1) from a dataset returning [label]", _n1_target),
    Case("one-based", "Labels that start at 1", _one_based),
    Case("ntc", "Sequence logits (N, T, C) without the transpose", _ntc),
    Case("ntc-square", "Sequence logits (N, T, C) with T == C: silently wrong in both", _ntc_square,
         "Shapes alone cannot tell (N, T, C) from (N, C, T) here; only the transpose fixes it."),
    Case("nhwc", "Channels-last segmentation logits (N, H, W, C)", _nhwc),
    Case("mask-255", "Segmentation masks with 255 for 'void' pixels", _mask_255,
         "On CUDA, stock torch dies with 'device-side assert triggered' and the process must restart."),
    Case("float-labels", "Class labels stored as float", _float_labels),
    Case("prob-targets", "Probability targets that are not normalized", _unnormalized_probs),
    Case("nan-logits", "NaN in the logits", _nan_logits),
    Case("all-ignored", "A micro-batch where every target is padding (ignore_index)", _all_ignored),
    Case("weight-length", "A class weight with the wrong length", _weight_len),
    Case("weight-dtype", "A float64 class weight with float32 logits", _weight_dtype),
    Case("negative-smoothing", "label_smoothing=-0.1", _negative_smoothing),
    Case("bad-reduction", "reduction='avg'", _bad_reduction),
    Case("single-output", "A binary problem with one output and CrossEntropyLoss", _single_output),
]



def _call(shape: tuple[int, ...], target: object, **kwargs: object) -> Callable[[], tuple[tuple, dict]]:
    """A case from logits of ``shape`` (seeded) and a target (a tensor, or a function of nothing)."""

    def make() -> tuple[tuple, dict]:
        x = torch.randn(*shape, generator=_g()) if shape else torch.tensor(1.0)
        t = target() if callable(target) else target
        return (x, t), dict(kwargs)

    return make


def _labels(high: int, *shape: int) -> Callable[[], torch.Tensor]:
    return lambda: torch.randint(0, high, shape, generator=_g(1))


def _half_inf():
    x = torch.randn(3, 5, generator=_g()).half()
    x[0, 0] = math.inf
    return (x, torch.tensor([0, 1, 2])), {}


def _half_overflow():
    x = torch.zeros(2, 3).half()
    x[0, 0], x[0, 1] = 60000.0, -60000.0  # finite logits; row 0's loss is 120000
    return (x, torch.tensor([1, 0])), {}


def _nan_soft_labels():
    y = torch.tensor([[0.5, 0.5, 0.0], [math.nan, 0.5, 0.5]])
    return (torch.randn(2, 3, generator=_g()), y), {}


def _minus_inf_target():
    x = torch.randn(3, 5, generator=_g())
    x[1, 1] = -math.inf
    return (x, torch.tensor([0, 1, 2])), {}


# The same output on every machine (docs/errors.md is generated from these cases), so no real GPU.
_META_NOTE = (
    "The demo runs on CPU only, so a 'meta' tensor (shape and dtype, no data) stands in for a "
    "tensor on the GPU; there the message names cuda:0."
)

# Every other message safeloss can print: in docs/errors.md and `safeloss demo --all`.
MORE_CASES = [
    Case("target-batch-larger", "More labels than predictions", _call((2, 5), _labels(5, 6))),
    Case("hard-coded-batch", "A model with a hard-coded batch size on the last, smaller batch",
         _call((32, 5), _labels(5, 20))),
    Case("flat-logits-2d-target", "Flattened logits with unflattened (N, T) labels", _call((12, 5), _labels(5, 3, 4))),
    Case("flat-target-3d", "Flattened labels with unflattened (N, T, C) logits", _call((2, 7, 5), _labels(5, 14))),
    Case("flat-target-kdim", "Flattened labels with (N, C, T) logits", _call((2, 5, 4), _labels(5, 8))),
    Case("onehot-wrong-classes", "One-hot labels with a different number of classes than the model",
         _call((3, 5), lambda: torch.eye(4)[:3].long())),
    Case("one-sample", "One sample's logits with a batch of labels", _call((5,), _labels(5, 3))),
    Case("unpairable", "A target shape that fits nothing", _call((2, 5, 4), _labels(5, 2, 3, 3))),
    Case("fractional-labels", "Float labels with fractions", _call((4, 5), lambda: torch.tensor([0.0, 1.5, 2.0, math.nan]))),
    Case("bool-labels", "Boolean labels", _call((4, 2), lambda: torch.tensor([True, False, True, True]))),
    Case("multi-hot", "Multi-hot (multi-label) integer targets", _call((2, 3), lambda: torch.tensor([[1, 1, 0], [0, 1, 0]]))),
    Case("negative-probabilities", "Probability targets with negative entries",
         _call((2, 3), lambda: torch.tensor([[1.2, -0.2, 0.0], [0.2, 0.3, 0.5]]))),
    Case("padding-minus-one", "Padding labels of -1 with the default ignore_index=-100",
         _call((4, 3), lambda: torch.tensor([0, 1, -1, -1]))),
    Case("too-few-outputs", "Labels beyond the model's outputs", _call((5, 3), lambda: torch.tensor([0, 3, 7, 9, 9]))),
    Case("negative-labels", "Negative labels that are not ignore_index", _call((3, 3), lambda: torch.tensor([-3, -7, 1]))),
    Case("minus-inf-target", "-inf on the target class", _minus_inf_target),
    Case("empty-batch", "An empty batch with reduction='mean'",
         _call((0, 5), lambda: torch.zeros(0, dtype=torch.long))),
    Case("zero-weight", "Every target's class has weight 0",
         _call((2, 3), lambda: torch.tensor([0, 0]), weight=torch.tensor([0.0, 1.0, 1.0]))),
    Case("negative-weight", "Negative class weights",
         _call((6, 5), _labels(5, 6), weight=torch.tensor([1.0, -0.5, 1.0, -2.0, 1.0]))),
    Case("integer-weight", "An integer class weight", _call((3, 5), _labels(5, 3), weight=torch.ones(5, dtype=torch.long))),
    Case("smoothing-above-one", "label_smoothing=1.5", _call((3, 5), _labels(5, 3), label_smoothing=1.5)),
    Case("smoothing-percent", "label_smoothing=10 (a percentage)", _call((3, 5), _labels(5, 3), label_smoothing=10.0)),
    Case("reduction-case", "reduction='Mean'", _call((3, 5), _labels(5, 3), reduction="Mean")),
    Case("prob-ignore-index", "ignore_index with probability targets",
         _call((4, 5), lambda: torch.full((4, 5), 0.2), ignore_index=3)),
    Case("integer-logits", "Integer logits (labels passed first)", lambda: ((_labels(5, 3, 5)(), _labels(5, 3)()), {})),
    Case("scalar-logits", "A 0-d input", _call((), lambda: torch.tensor(0))),
    Case("target-device", "Labels on another device than the logits",
         _call((3, 5), lambda: torch.zeros(3, dtype=torch.long, device="meta")), _META_NOTE),
    Case("weight-device", "A class weight on another device than the logits",
         _call((3, 5), _labels(5, 3), weight=torch.ones(5, device="meta")), _META_NOTE),
    Case("nonfinite-half", "float16 logits that overflowed to inf", _half_inf),
    Case("float16-loss-overflow", "float16 logits whose loss does not fit float16", _half_overflow),
    Case("nan-soft-labels", "NaN inside probability targets", _nan_soft_labels),
    Case("zero-classes", "Logits with no classes (a zero-sized class dimension)",
         _call((4, 0), lambda: torch.full((4,), -100))),
    Case("uint64-minus-one", "A -1 label stored as uint64 (2**64 - 1) with ignore_index=-1",
         _call((4, 5), lambda: torch.tensor([0, 1, 2**64 - 1, 2], dtype=torch.uint64), ignore_index=-1)),
    Case("weight-dtype-half", "A float32 class weight with float16 logits (a model converted with .half())",
         lambda: ((torch.randn(4, 5, generator=_g()).half(), torch.randint(0, 5, (4,), generator=_g(1))),
                  {"weight": torch.ones(5)})),
]


# linear_cross_entropy (an LLM head's matmul and the loss in one call): the mistakes of a head.


def _lce(x_shape: tuple[int, ...], w_shape: tuple[int, ...], target: object, dtype: torch.dtype = torch.float32,
         **kwargs: object) -> Callable[[], tuple[tuple, dict]]:
    """A linear_cross_entropy case: hidden states and a head of these shapes (seeded), a target."""

    def make() -> tuple[tuple, dict]:
        x = torch.randn(*x_shape, generator=_g()).to(dtype)
        w = torch.randn(*w_shape, generator=_g(2)).to(dtype)
        t = target() if callable(target) else target
        return (x, w, t), {k: (v() if callable(v) else v) for k, v in kwargs.items()}

    return make


def _lce_nan_hidden():
    x = torch.randn(6, 8, generator=_g())
    x[3, 2] = math.nan
    return (x, torch.randn(5, 8, generator=_g(2)), torch.tensor([0, 1, 2, 3, 4, 0])), {}


def _lce_half_overflow():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float16)
    w = torch.tensor([[40000.0, 0.0], [-40000.0, 0.0], [0.0, 0.0]], dtype=torch.float16)
    return (x, w, torch.tensor([1, 2])), {"reduction": "none"}  # row 0's loss is 80000


def _options(**kw: object) -> Callable[[], object]:
    return lambda: torch.nn.LinearCrossEntropyOptions(**kw)


LINEAR_CASES = [
    Case("lce-3d-hidden", "linear_cross_entropy: hidden states (batch, seq, H) not flattened",
         _lce((2, 3, 8), (5, 8), lambda: torch.randint(0, 5, (2, 3), generator=_g(1))), op="linear_cross_entropy"),
    Case("lce-transposed-weight", "linear_cross_entropy: a head weight stored (H, C), as for x @ W",
         _lce((6, 8), (8, 50), lambda: torch.randint(0, 8, (6,), generator=_g(1))), op="linear_cross_entropy"),
    Case("lce-logits-as-input", "linear_cross_entropy: the head's output (logits) passed as the hidden states",
         _lce((6, 50), (50, 8), lambda: torch.randint(0, 50, (6,), generator=_g(1))), op="linear_cross_entropy"),
    Case("lce-shifted-labels", "linear_cross_entropy: next-token labels shifted, hidden states not cut",
         _lce((12, 8), (5, 8), lambda: torch.randint(0, 5, (10,), generator=_g(1))), op="linear_cross_entropy"),
    Case("lce-unflattened-labels", "linear_cross_entropy: flattened hidden states with (batch, seq) labels",
         _lce((6, 8), (5, 8), lambda: torch.randint(0, 5, (2, 3), generator=_g(1))), op="linear_cross_entropy"),
    Case("lce-one-sample-batch-of-labels", "linear_cross_entropy: one sample's hidden state (H,) with a batch of labels",
         _lce((8,), (5, 8), lambda: torch.tensor([0, 1, 2])), op="linear_cross_entropy"),
    Case("lce-vocab-too-small", "linear_cross_entropy: token ids beyond the head's vocabulary",
         _lce((6, 8), (5, 8), lambda: torch.tensor([0, 1, 2, 5, 255, 3])), op="linear_cross_entropy"),
    Case("lce-padding-minus-one", "linear_cross_entropy: padding labels of -1 with the default ignore_index",
         _lce((6, 8), (5, 8), lambda: torch.tensor([0, 1, -1, 3, 4, -1])), op="linear_cross_entropy"),
    Case("lce-bias-of-another-layer", "linear_cross_entropy: a bias of length H instead of C",
         _lce((6, 8), (5, 8), lambda: torch.randint(0, 5, (6,), generator=_g(1)), linear_bias=lambda: torch.zeros(8)),
         op="linear_cross_entropy"),
    Case("lce-dtype-mismatch", "linear_cross_entropy: float64 hidden states with a float32 head",
         lambda: ((torch.randn(6, 8, generator=_g()).double(), torch.randn(5, 8, generator=_g(2)),
                   torch.randint(0, 5, (6,), generator=_g(1))), {}), op="linear_cross_entropy"),
    Case("lce-n1-target", "linear_cross_entropy: labels of shape (N, 1)",
         _lce((6, 8), (5, 8), lambda: torch.randint(0, 5, (6, 1), generator=_g(1))), op="linear_cross_entropy"),
    Case("lce-nan-hidden", "linear_cross_entropy: NaN in the hidden states", _lce_nan_hidden, op="linear_cross_entropy"),
    Case("lce-float16-overflow", "linear_cross_entropy: a float16 loss above 65504",
         _lce_half_overflow, op="linear_cross_entropy"),
    Case("lce-all-padding", "linear_cross_entropy: a micro-batch of padding only, reduction='mean'",
         _lce((6, 8), (5, 8), lambda: torch.full((6,), -100)), op="linear_cross_entropy"),
    Case("lce-prob-ignore-index", "linear_cross_entropy: ignore_index with probability targets",
         _lce((6, 8), (5, 8), lambda: torch.full((6, 5), 0.2), ignore_index=-100), op="linear_cross_entropy"),
    Case("lce-sparse-bias", "linear_cross_entropy: a sparse bias",
         _lce((6, 8), (5, 8), lambda: torch.randint(0, 5, (6,), generator=_g(1)),
              linear_bias=lambda: torch.zeros(5).to_sparse()), op="linear_cross_entropy"),
    Case("lce-options-acc-dtype", "linear_cross_entropy: options whose acc_dtype the input cannot take",
         _lce((6, 8), (5, 8), lambda: torch.randint(0, 5, (6,), generator=_g(1)),
              options=_options(acc_dtype=torch.bfloat16)), op="linear_cross_entropy"),
    Case("lce-options-conflict", "linear_cross_entropy: batch_chunk_size and a chunking_method that disagree",
         _lce((6, 8), (5, 8), lambda: torch.randint(0, 5, (6,), generator=_g(1)),
              options=_options(batch_chunk_size=2, chunking_method="aspect_ratio")), op="linear_cross_entropy"),
]


def _outcome(fn: Callable[[], torch.Tensor]) -> str:
    """What a call did, in words: the value (plus warnings), or the exception's text."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            value = fn()
            text = f"returns {_fmt_value(value)}"
        except Exception as e:  # the demo shows every failure, whatever its type
            text = f"{_exc_name(e)}: {e}"
    for w in caught:
        if "size_average" in str(w.message):
            continue
        text += f"\n{w.category.__name__}: {w.message}"
    return text


def _exc_name(e: BaseException) -> str:
    cls = type(e)
    return cls.__name__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__name__}"


def _fmt_value(v: torch.Tensor) -> str:
    if v.dim() == 0:
        return f"loss = {v.item():.4f}"
    return f"a tensor of shape {tuple(v.shape)}"


def _wrap(text: str, width: int) -> list[str]:
    """``text`` in lines of at most ``width`` columns (long words broken too: shapes, paths)."""
    out: list[str] = []
    for line in text.splitlines() or [""]:
        out += textwrap.wrap(line, width, subsequent_indent="  ") or [""]
    return out


def _columns(left: str, right: str, width: int) -> str:
    col = (width - 3) // 2
    a, b = _wrap(left, col), _wrap(right, col)
    a += [""] * (len(b) - len(a))
    b += [""] * (len(a) - len(b))
    return "\n".join(f"{x:<{col}} | {y}".rstrip() for x, y in zip(a, b))


def _stacked(left: str, right: str, width: int) -> str:
    """Narrow terminals: stock torch's outcome above safeloss's, each wrapped to the width."""
    return "\n".join(_wrap(left, width) + [""] + _wrap(right, width))


# Side by side from this many columns on; below it, one above the other.
SIDE_BY_SIDE = 100


def run_case(case: Case, strict: bool = False) -> tuple[str, str]:
    """(what stock torch did, what safeloss did) for one case, as text."""
    import safeloss

    stock_fn, safe_fn = (
        (F.linear_cross_entropy, safeloss.linear_cross_entropy) if case.op == "linear_cross_entropy"
        else (F.cross_entropy, safeloss.cross_entropy))
    args, kwargs = case.make()
    stock = _outcome(lambda: stock_fn(*args, **kwargs))
    safeloss.reset_warnings()
    args, kwargs = case.make()  # fresh tensors: nothing may depend on the stock call
    ours = _outcome(lambda: safe_fn(*args, **kwargs, strict=strict))
    return stock, ours


def main(only: str | None = None, color: bool = False, all_cases: bool = False) -> int:
    import safeloss

    # The terminal's width (COLUMNS first), within reason: every line fits it.
    width = max(40, min(shutil.get_terminal_size((140, 40)).columns, 180))
    side = width >= SIDE_BY_SIDE
    bold = (lambda s: f"\033[1m{s}\033[0m") if color else (lambda s: s)

    def say(text: str, strong: bool = False) -> None:
        for line in _wrap(text, width):
            print(bold(line) if strong else line)

    # --only searches every case: a name from docs/errors.md or --all must be found without --all.
    pool = CASES + MORE_CASES + LINEAR_CASES if all_cases or only is not None else CASES
    cases = [c for c in pool if only is None or only in c.name]
    ops = sorted({c.op for c in cases}) or ["cross_entropy"]
    # The functions the columns run, as the cases chosen call them (each case's title says which
    # op it runs when they differ).
    names = " / ".join(ops)
    say(f"safeloss {safeloss.__version__} demo: stock torch {torch.__version__} vs safeloss, same inputs", True)
    say("Each case runs both calls for real. "
        + (f"Left: torch.nn.functional.{names}. Right: safeloss.{names}." if side else
           f"First torch.nn.functional.{names}, then safeloss.{names}."))
    print()
    if not cases:
        print(f"no demo case matches {only!r}; cases: {', '.join(c.name for c in pool)}")
        return 2
    for i, case in enumerate(cases, 1):
        stock, ours = run_case(case)
        say(f"[{i}/{len(cases)}] {case.title}  ({case.name})", True)
        if case.note:
            say(f"    {case.note}")
        fn = "" if case.op == "cross_entropy" else f" ({case.op})"
        layout = _columns if side else _stacked
        print(layout(f"STOCK TORCH{fn}\n" + stock, f"SAFELOSS{fn}\n" + ours, width))
        print("-" * width)
    say("Strict mode (safeloss.strict_mode(), strict=True or SAFELOSS_STRICT=1) turns every warning above into an error.")
    return 0
