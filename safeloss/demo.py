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


def _columns(left: str, right: str, width: int) -> str:
    col = (width - 3) // 2

    def wrap(text: str) -> list[str]:
        out: list[str] = []
        for line in text.splitlines() or [""]:
            out += textwrap.wrap(line, col, subsequent_indent="  ") or [""]
        return out

    a, b = wrap(left), wrap(right)
    a += [""] * (len(b) - len(a))
    b += [""] * (len(a) - len(b))
    return "\n".join(f"{x:<{col}} | {y}" for x, y in zip(a, b))


def run_case(case: Case, strict: bool = False) -> tuple[str, str]:
    """(what stock torch did, what safeloss did) for one case, as text."""
    import safeloss

    args, kwargs = case.make()
    stock = _outcome(lambda: F.cross_entropy(*args, **kwargs))
    safeloss.reset_warnings()
    ours = _outcome(lambda: safeloss.cross_entropy(*args, **kwargs, strict=strict))
    return stock, ours


def main(only: str | None = None, color: bool = False) -> int:
    import safeloss

    width = max(100, min(shutil.get_terminal_size((140, 40)).columns, 180))
    bold = (lambda s: f"\033[1m{s}\033[0m") if color else (lambda s: s)
    print(bold(f"safeloss {safeloss.__version__} demo: stock torch {torch.__version__} vs safeloss, same inputs"))
    print("Each case runs both calls for real. Left: torch.nn.functional.cross_entropy. Right: safeloss.cross_entropy.\n")
    cases = [c for c in CASES if only is None or only in c.name]
    if not cases:
        print(f"no demo case matches {only!r}; cases: {', '.join(c.name for c in CASES)}")
        return 2
    for i, case in enumerate(cases, 1):
        stock, ours = run_case(case)
        print(bold(f"[{i}/{len(cases)}] {case.title}") + f"  ({case.name})")
        if case.note:
            print(f"    {case.note}")
        print(_columns("STOCK TORCH\n" + stock, "SAFELOSS\n" + ours, width))
        print("-" * width)
    print("Strict mode (safeloss.strict_mode(), strict=True or SAFELOSS_STRICT=1) turns every warning above into an error.")
    return 0
