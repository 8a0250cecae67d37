"""A hostile pass on the hints (h13): every message tells the truth about the input that
triggers it, and every ``Fix:`` works when applied as written.

The tests take the fix out of the message (the code it quotes, with the user's names), run it,
and compare the result with stock torch on the fixed call. Each test was written against a
message that failed it: a fix that raised another error, a fix that code cannot run, a
quotation of stock torch that is not what stock says, a cause the input contradicts, a message
naming a function the caller did not call.
"""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import safeloss
from tests.tolerances import assert_matches

ROOT = Path(__file__).resolve().parents[1]


def _message(fn) -> str:
    """The text of the error ``fn`` raises, or of the one warning it gives."""
    safeloss.reset_warnings()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fn()
        except safeloss.SafeLossError as e:
            return str(e)
    texts = [str(w.message) for w in caught if issubclass(w.category, safeloss.SafeLossWarning)]
    assert len(texts) == 1, texts
    return texts[0]


def _quiet(fn):
    """``fn()``, which must give no safeloss warning."""
    safeloss.reset_warnings()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    found = [str(w.message) for w in caught if issubclass(w.category, safeloss.SafeLossWarning)]
    assert not found, found
    return out


def _fix(text: str) -> str:
    assert "\nFix: " in text, text
    return text.split("\nFix: ", 1)[1]


def _code(text: str, start: str) -> str:
    """The first expression of the Fix line that begins with ``start``, up to its balanced
    closing parenthesis: the code a user copies."""
    fix = _fix(text)
    assert start in fix, f"{start!r} not in the fix: {fix}"
    i = fix.index(start)
    depth = 0
    for j in range(i, len(fix)):
        depth += fix[j] == "("
        depth -= fix[j] == ")"
        if fix[j] == ")" and depth == 0 and fix[j + 1 : j + 2] not in ("(", "."):  # chained calls: go on
            return fix[i : j + 1]
    raise AssertionError(f"unbalanced code in the fix: {fix}")


def _run(code: str, **names: object) -> object:
    return eval(code, {"torch": torch, "safeloss": safeloss, "F": F, **names})


# ---------------------------------------------------------------- one sample's logits, a batch


def test_one_sample_logits_with_several_labels_never_suggest_a_batch_of_one():
    """(C,) logits with 3 labels: the fix was ``logits.unsqueeze(0)``, which gives (1, C) logits
    for 3 labels, a BatchSizeMismatchError. The labels are 3 samples': name their logits."""
    logits, target = torch.randn(5), torch.tensor([0, 1, 2])
    text = _message(lambda: safeloss.cross_entropy(logits, target))
    assert "unsqueeze" not in text
    assert "3 labels" in text and "(3, 5)" in _fix(text)
    logits3 = torch.randn(3, 5)  # what the fix asks for: every sample's logits
    assert_matches(safeloss.cross_entropy(logits3, target), F.cross_entropy(logits3, target))


@pytest.mark.parametrize("target", [torch.tensor([[3]]), torch.tensor([[[1]]]),
                                    torch.tensor([[0.1, 0.2, 0.3, 0.2, 0.2]])])
def test_one_sample_logits_fix_for_one_label_or_one_row_of_probabilities_runs(target):
    logits = torch.randn(5)
    text = _message(lambda: safeloss.cross_entropy(logits, target))
    call = _code(text, "safeloss.cross_entropy(")
    got = _quiet(lambda: _run(call, logits=logits, target=target))
    fixed = _run(call.replace("safeloss.cross_entropy", "F.cross_entropy"), logits=logits, target=target)
    assert_matches(got, fixed)


# ---------------------------------------------------------------- one-hot fixes for every dtype


ONEHOT_DTYPES = [torch.int64, torch.int32, torch.uint8, torch.bool, torch.uint16, torch.uint32, torch.uint64]


@pytest.mark.parametrize("dtype", ONEHOT_DTYPES)
@pytest.mark.parametrize("shape", [(4, 3), (3,), (2, 3, 4)])
def test_integer_onehot_fix_runs_for_its_dtype_and_rank(dtype, shape):
    """The fix said ``target.argmax(dim=1)``: argmax has no kernel for bool or uint16/32/64
    (RuntimeError / NotImplementedError), and a 1-D one-hot has no dim 1 (IndexError)."""
    C = shape[0] if len(shape) == 1 else shape[1]
    labels = torch.randint(0, C, shape[:1] + shape[2:] if len(shape) > 1 else ())
    cdim = 0 if len(shape) == 1 else 1
    target = F.one_hot(labels, C).movedim(-1, cdim).to(dtype)
    logits = torch.randn(shape)
    text = _message(lambda: safeloss.cross_entropy(logits, target))
    indices = _run(re.search(r"target(\.long\(\))?\.argmax\(dim=\d\)", _fix(text)).group(0), target=target)
    assert torch.equal(indices, labels)
    assert_matches(_quiet(lambda: safeloss.cross_entropy(logits, indices)), F.cross_entropy(logits, labels))


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.uint64])
def test_onehot_fix_with_a_non_negative_ignore_index_runs(dtype):
    """IgnoreIndexError for a one-hot target: its fix, class indices with ignore_index kept."""
    labels = torch.tensor([0, 2, 1, 1])
    target, logits = F.one_hot(labels, 3).to(dtype), torch.randn(4, 3)
    text = _message(lambda: safeloss.cross_entropy(logits, target, ignore_index=2))
    indices = _run(re.search(r"target(\.long\(\))?\.argmax\(dim=1\)", _fix(text)).group(0), target=target)
    assert_matches(safeloss.cross_entropy(logits, indices, ignore_index=2),
                   F.cross_entropy(logits, labels, ignore_index=2))


def test_multi_hot_with_an_empty_row_says_so_and_its_fix_keeps_the_loss_finite():
    """A row with no 1: target.float() / target.sum(...) divided it by 0 (NaN), and argmax read it
    as class 0. The message names such rows, and the fix drops them first."""
    target = torch.tensor([[1, 1, 0], [0, 0, 0], [0, 1, 0]])
    logits = torch.randn(3, 3)
    text = _message(lambda: safeloss.cross_entropy(logits, target))
    assert "1 row with no 1 (at [1])" in text, text
    assert "keep = target.sum(dim=1) > 0" in _fix(text)
    keep = target.sum(dim=1) > 0
    probs = _run(re.search(r"target\.float\(\) / target\.sum\(dim=1, keepdim=True\)", _fix(text)).group(0),
                 target=target[keep])
    out = safeloss.cross_entropy(logits[keep], probs)
    assert torch.isfinite(out)
    assert_matches(out, F.cross_entropy(logits[keep], probs))


def test_probability_targets_with_all_zero_rows_get_a_fix_that_keeps_them_finite():
    """Counts with an all-zero row (a masked position): target / target.sum(...) made it NaN."""
    target = torch.tensor([[2.0, 1, 0], [0, 0, 0], [1, 1, 1], [0, 0, 5]])
    logits = torch.randn(4, 3)
    text = _message(lambda: safeloss.cross_entropy(logits, target))
    assert "1 row is all zeros (at [1])" in text, text
    assert "keep = target.sum(dim=1) > 0; input[keep], target[keep]" in _fix(text)
    keep = target.sum(dim=1) > 0
    fixed = _run("target / target.sum(dim=1, keepdim=True)", target=target[keep])
    assert_matches(_quiet(lambda: safeloss.cross_entropy(logits[keep], fixed)), F.cross_entropy(logits[keep], fixed))


def test_k_dim_probability_targets_with_all_zero_positions_fix_indexes_positions():
    target = torch.rand(2, 3, 4)
    target[0, :, 1] = 0
    logits = torch.randn(2, 3, 4)
    text = _message(lambda: safeloss.cross_entropy(logits, target))
    assert "input.movedim(1, -1)[keep], target.movedim(1, -1)[keep]" in _fix(text)
    keep = target.sum(dim=1) > 0
    x2, t2 = logits.movedim(1, -1)[keep], target.movedim(1, -1)[keep]
    t2 = t2 / t2.sum(dim=1, keepdim=True)
    assert_matches(_quiet(lambda: safeloss.cross_entropy(x2, t2)), F.cross_entropy(x2, t2))


# ---------------------------------------------------------------- ignore_index that is already in use


def _bad_label_cases():
    seq = torch.tensor([[0, 1, 2, 3, -100, -100], [0, 1, 5, 5, 5, 5]])  # pad id 5 = vocab size
    mask = torch.randint(0, 3, (2, 4, 4), generator=torch.Generator().manual_seed(0))
    mask[0, 0, :2] = 255
    mask[1, 1, 1] = -100
    return [
        ("minus-one", torch.randn(6, 3), torch.tensor([0, 1, -100, -1, -1, 2]), -1),
        ("void-255", torch.randn(2, 3, 4, 4), mask, 255),
        ("pad-run", torch.randn(2, 5, 6), seq, 5),
    ]


@pytest.mark.parametrize("name, logits, target, v", _bad_label_cases(), ids=[c[0] for c in _bad_label_cases()])
def test_ignore_index_fix_keeps_the_positions_already_ignored(name, logits, target, v):
    """The target also holds -100 (the ignore_index in use): ``ignore_index=v`` would turn those
    positions into bad labels (the next error suggested ignore_index=-100 again). The fix maps v
    to the ignore_index in use instead."""
    text = _message(lambda: safeloss.cross_entropy(logits, target))
    assert f"ignore_index={v})" not in _fix(text), text
    fixed = _run(_code(text, "target.masked_fill("), target=target)
    assert_matches(safeloss.cross_entropy(logits, fixed), F.cross_entropy(logits, fixed))


def test_ignore_index_fix_without_ignored_positions_is_unchanged():
    text = _message(lambda: safeloss.cross_entropy(torch.randn(4, 3), torch.tensor([0, 1, -1, -1])))
    assert _fix(text) == "cross_entropy(..., ignore_index=-1)  or  CrossEntropyLoss(ignore_index=-1)"


def test_one_based_fix_keeps_the_ignored_positions():
    """``target - 1`` turned the ignore_index -100 into -101, a bad label."""
    target = torch.tensor([1, 2, 3, 4, 5, -100, 5, 1])
    logits = torch.randn(8, 5)
    text = _message(lambda: safeloss.cross_entropy(logits, target))
    assert "1-based" in text
    fixed = _run(_code(text, "torch.where("), target=target)
    assert torch.equal(fixed, torch.tensor([0, 1, 2, 3, 4, -100, 4, 0]))
    assert_matches(safeloss.cross_entropy(logits, fixed), F.cross_entropy(logits, fixed))


# ---------------------------------------------------------------- batch sizes


def test_more_labels_than_predictions_fix_is_not_a_no_op():
    """(2, 5) logits, 6 labels: the fix ended "logits.reshape(-1, C) together with
    labels.reshape(-1)", which leaves (2, 5) logits as they are (the same error again)."""
    text = _message(lambda: safeloss.cross_entropy(torch.randn(2, 5), torch.randint(0, 5, (6,))))
    assert "reshape(-1, C) together" not in text
    assert "logits of shape (6, 5)" in _fix(text)


def test_batch_multiples_quote_the_k_dim_shapes():
    """K-d logits: the labels' shape was quoted as (N, k), without the positions."""
    text = _message(lambda: safeloss.cross_entropy(torch.randn(2, 5, 4), torch.randint(0, 5, (6, 4))))
    assert "labels flattened from shape (2, 3, 4)" in text and "logits of shape (6, 5, 4)" in _fix(text)
    logits = torch.randn(8, 5, 4)  # 4 positions of each of 2 samples folded into the batch
    text = _message(lambda: safeloss.cross_entropy(logits, torch.randint(0, 5, (2, 4))))
    assert "labels of shape (2, 4, 4) flattened with .flatten(0, 1)" in _fix(text)
    per_position = torch.randint(0, 5, (2, 4, 4))
    assert_matches(safeloss.cross_entropy(logits, per_position.flatten(0, 1)),
                   F.cross_entropy(logits, per_position.flatten(0, 1)))


def test_an_empty_target_is_not_blamed_on_a_hard_coded_batch_size():
    text = _message(lambda: safeloss.cross_entropy(torch.randn(4, 5), torch.zeros(0, dtype=torch.long)))
    assert "hard-coded" not in text and "last, smaller batch" not in text
    assert "The target is empty" in text


def test_per_position_labels_for_pooled_logits_fix_is_not_a_no_op():
    """(4, 5) logits with (4, 7) labels: "logits.reshape(-1, C)" of (4, 5) logits changes nothing."""
    text = _message(lambda: safeloss.cross_entropy(torch.randn(4, 5), torch.randint(2, 5, (4, 7))))
    assert "logits.reshape(-1, C) with" not in text
    assert "(N, 7, C)" in _fix(text)


# ---------------------------------------------------------------- stock torch, quoted


@pytest.mark.parametrize("shape", [(5,), (4, 5), (4, 5, 3), (4, 5, 3, 2)])
def test_weight_requires_grad_quotes_stocks_own_words(shape):
    """It quoted "nll_loss_forward is not differentiable wrt weight"; stock says "The function
    'nll_loss_forward' is not differentiable with respect to argument 'weight'" (nll_loss2d_forward
    for K-d logits)."""
    x = torch.randn(shape)
    t = torch.randint(0, 5, shape[:1] + shape[2:] if len(shape) > 1 else ())
    w = torch.ones(5, requires_grad=True)
    with pytest.raises(RuntimeError) as stock:
        F.cross_entropy(x, t, weight=w)
    first = str(stock.value).split(". ")[0]
    with pytest.raises(safeloss.WeightError) as ours:
        safeloss.cross_entropy(x, t, weight=w)
    assert f'"{first}"' in str(ours.value), (first, str(ours.value))
    assert_matches(safeloss.cross_entropy(x, t, weight=w.detach()), F.cross_entropy(x, t, weight=w.detach()))


# ---------------------------------------------------------------- linear_cross_entropy


@pytest.mark.parametrize("b_dtype", [torch.float16, torch.float64])
def test_linear_bias_dtype_mismatch_fix_casts_the_bias(b_dtype):
    """Input and head in float32, bias not: the fix was input.to(linear_bias.dtype), which then
    mismatches linear_weight; the cause blamed the head; the quote was the weight's."""
    x, w, t = torch.randn(6, 8), torch.randn(5, 8), torch.randint(0, 5, (6,))
    b = torch.zeros(5, dtype=b_dtype)
    with pytest.raises(RuntimeError) as stock:
        F.linear_cross_entropy(x, w, t, linear_bias=b)
    text = _message(lambda: safeloss.linear_cross_entropy(x, w, t, linear_bias=b))
    assert f'"{str(stock.value).split(", but")[0]}"' in text
    assert "input.to(" not in _fix(text) and "head was cast" not in text
    code = _code(text, "linear_bias.to(")
    fixed = _run(code, linear_bias=b, input=x)
    assert_matches(safeloss.linear_cross_entropy(x, w, t, linear_bias=fixed),
                   F.linear_cross_entropy(x, w, t, linear_bias=fixed))


@pytest.mark.parametrize("x_dtype, w_dtype", [(torch.float64, torch.float32), (torch.float32, torch.float64),
                                              (torch.float16, torch.float32)])
def test_linear_autocast_is_offered_only_where_it_fixes_the_dtypes(x_dtype, w_dtype):
    """Autocast never casts float64: "or run the step under torch.autocast" failed there as before."""
    x, w, t = torch.randn(6, 8, dtype=x_dtype), torch.randn(5, 8, dtype=w_dtype), torch.randint(0, 5, (6,))
    text = _message(lambda: safeloss.linear_cross_entropy(x, w, t))
    offered = "autocast" in _fix(text)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            F.linear_cross_entropy(x, w, t)
        works = True
    except RuntimeError:
        works = False
    assert offered == works, text
    fixed = _run(_code(text, "input.to("), input=x, linear_weight=w)
    assert_matches(safeloss.linear_cross_entropy(fixed, w, t), F.linear_cross_entropy(fixed, w, t))


def test_linear_nonfinite_fix_names_the_tensor_that_holds_nan():
    """The fix read ``torch.isfinite(t).all()``: there is no ``t`` in this call."""
    x = torch.randn(6, 8)
    x[3, 2] = math.nan
    text = _message(lambda: safeloss.linear_cross_entropy(x, torch.randn(5, 8), torch.randint(0, 5, (6,))))
    assert "isfinite(t)" not in text and "torch.isfinite(input).all()" in _fix(text)


def test_linear_multi_hot_fix_names_logits_this_call_can_make():
    """"BCEWithLogitsLoss()(logits, target)": a linear_cross_entropy caller has no logits."""
    x, w = torch.randn(6, 8), torch.randn(5, 8)
    target = torch.ones(6, 5)
    text = _message(lambda: safeloss.linear_cross_entropy(x, w, target))
    code = _code(text, "torch.nn.BCEWithLogitsLoss()(")
    out = _run(code, input=x, linear_weight=w, linear_bias=None, target=target)
    assert torch.isfinite(out)


def test_linear_2d_integer_labels_are_not_called_probabilities():
    """(N, T) integer labels other than 0/1 for (N, H) hidden states: per-position labels, not
    one-hot rows (target.argmax(dim=1) would pick the position of the largest label)."""
    text = _message(lambda: safeloss.linear_cross_entropy(torch.randn(6, 8), torch.randn(5, 8),
                                                          torch.randint(2, 5, (6, 3))))
    assert "argmax" not in _fix(text) and "per position" in text


# ---------------------------------------------------------------- vocab_parallel_cross_entropy


@pytest.fixture
def world_of_one(tmp_path):
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group exists in this process")
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


VOCAB_CASES = {
    "padding": (lambda: (torch.randn(4, 3), torch.tensor([0, 1, -1, -1])), {}),
    "batch": (lambda: (torch.randn(8, 5), torch.tensor([0, 1])), {}),
    "n1-target": (lambda: (torch.randn(6, 4), torch.randint(0, 4, (6, 1))), {}),
    "softmaxed": (lambda: (torch.randn(8, 10).softmax(1), torch.randint(0, 10, (8,))), {}),
    "weight-dtype": (lambda: (torch.randn(4, 5), torch.tensor([0, 1, 2, 3])), {"weight": torch.ones(5, dtype=torch.float64)}),
    "empty-mean": (lambda: (torch.randn(4, 5), torch.full((4,), -100)), {}),
}


@pytest.mark.usefixtures("world_of_one")
@pytest.mark.parametrize("case", list(VOCAB_CASES))
def test_vocab_parallel_messages_name_the_function_called(case):
    """They said "cross_entropy got ..." and "Fix: cross_entropy(..., ignore_index=-1) or
    CrossEntropyLoss(ignore_index=-1)": neither is what the caller called, and there is no module."""
    make, kw = VOCAB_CASES[case]
    text = _message(lambda: safeloss.vocab_parallel_cross_entropy(*make(), **kw))
    words = re.findall(r"(?<![\w.])cross_entropy\b", text)
    assert not words, text
    assert "CrossEntropyLoss(" not in text and "loss_fn" not in text, text
    assert "vocab_parallel_cross_entropy" in text or case == "weight-dtype"  # it names no function


@pytest.mark.usefixtures("world_of_one")
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_vocab_parallel_float16_position_overflow_is_reported_as_one(reduction):
    """A position whose loss is 120000 in float16 logits: the message said "each of the 2
    per-position losses is finite, but their sum ... is above 65504", and reduction="none" gave
    no warning at all, with an inf in the result (as stock)."""
    x = torch.tensor([[60000.0, -60000.0, 0.0], [0.0, 0.0, 0.0]]).half()
    t = torch.tensor([1, 0])
    stock = F.cross_entropy(x, t, reduction=reduction)
    safeloss.reset_warnings()
    with pytest.warns(safeloss.SafeLossWarning) as caught:
        out = safeloss.vocab_parallel_cross_entropy(x, t, reduction=reduction)
    text = "\n".join(str(w.message) for w in caught)
    assert "the float16 loss overflowed at 1 of 2 positions (first at [0])" in text, text
    assert "each of the 2 per-position losses is finite" not in text
    assert out.dtype == stock.dtype and torch.equal(torch.isinf(out), torch.isinf(stock))


# ---------------------------------------------------------------- patch(): routes without ignore_index


@pytest.mark.usefixtures("clean_patch")
def test_timm_route_without_ignore_index_never_suggests_one(monkeypatch):
    """timm's LabelSmoothingCrossEntropy has no ignore_index, as the message's own note says; its
    fix said "cross_entropy(..., ignore_index=-1)  or  CrossEntropyLoss(ignore_index=-1)"."""
    import sys

    from tests.test_patch_reach import _timm_loss_module

    module = sys.modules.get("timm.loss.cross_entropy") or _timm_loss_module()
    monkeypatch.setitem(sys.modules, "timm.loss.cross_entropy", module)
    loss = module.LabelSmoothingCrossEntropy(0.1)
    x, target = torch.randn(4, 3), torch.tensor([0, 1, -1, -1])
    with safeloss.patch():
        text = _message(lambda: loss(x, target))
    fix = _fix(text).split("\n(timm", 1)[0]
    assert "cross_entropy(..., ignore_index" not in fix and "keep = target != -1" in fix, fix
    keep = target != -1
    with safeloss.patch():
        assert_matches(loss(x[keep], target[keep]), F.cross_entropy(x[keep], target[keep], label_smoothing=0.1))


# ---------------------------------------------------------------- clean inputs: no warning


def _clean_cases():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 50, (2, 9), generator=g)
    labels = tokens.clone()
    labels[0, :3] = -100
    hf_logits = torch.randn(2, 9, 50, generator=g)
    return {
        "stock-docs-indices": lambda: (torch.randn(3, 5, generator=g), torch.empty(3, dtype=torch.long).random_(5, generator=g)),
        "stock-docs-probs": lambda: (torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g).softmax(dim=1)),
        "hf-shifted": lambda: (hf_logits[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1)),
        "k-dim": lambda: (torch.randn(2, 3, 4, 4, generator=g), torch.randint(0, 3, (2, 4, 4), generator=g)),
        "bf16": lambda: (torch.randn(16, 7, generator=g).bfloat16(), torch.randint(0, 7, (16,), generator=g)),
        "fp16-small": lambda: (torch.randn(16, 2, generator=g).half() * 0.01, torch.randint(0, 2, (16,), generator=g)),
        "bf16-teacher": lambda: (torch.randn(8, 300, generator=g), torch.randn(8, 300, generator=g).bfloat16().softmax(1).float()),
        "mixup": lambda: (torch.randn(4, 10, generator=g),
                          0.7 * F.one_hot(torch.arange(4), 10).float() + 0.3 * F.one_hot(torch.arange(4).flip(0), 10).float()),
        "uint8-mask": lambda: (torch.randn(2, 3, 4, 4, generator=g), torch.randint(0, 3, (2, 4, 4), generator=g).to(torch.uint8)),
        "int32": lambda: (torch.randn(5, 4, generator=g), torch.randint(0, 4, (5,), generator=g).int()),
    }


@pytest.mark.parametrize("kw", [{}, {"label_smoothing": 0.1}, {"weight": "w"}, {"reduction": "none"}, {"reduction": "sum"}])
@pytest.mark.parametrize("case", list(_clean_cases()))
def test_clean_inputs_warn_nothing(case, kw):
    x, t = _clean_cases()[case]()
    kw = dict(kw)
    if kw.get("weight") == "w":
        kw["weight"] = torch.linspace(0.5, 2.0, x.shape[1], dtype=x.dtype if not t.is_floating_point() else torch.float32)
    out = _quiet(lambda: safeloss.cross_entropy(x, t, **kw))
    t_stock = t if t.is_floating_point() else t.long()  # stock takes int64 labels only (uint8 for (N, C))
    truth = None
    if x.dtype in (torch.float16, torch.bfloat16):
        wide = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
        truth = F.cross_entropy(x.double(), t_stock.double() if t.is_floating_point() else t_stock, **wide)
    assert_matches(out, F.cross_entropy(x, t_stock, **kw), truth)


# ---------------------------------------------------------------- the docs quote real messages


def _readme_messages() -> list[str]:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"^```(\w*)[^\n]*\n(.*?)^```", text, re.S | re.M)
    return [b for lang, b in blocks if not lang and b.startswith("safeloss.")]


def test_readme_message_blocks_are_what_the_code_prints():
    """README.md shows three messages outside the table (which test_docs.py checks); each line,
    up to an elided "...", must be what the code prints for that input."""
    blocks = _readme_messages()
    assert len(blocks) == 3
    catalogue = (ROOT / "docs" / "errors.md").read_text()
    meta = torch.empty(8192, 4096, device="meta"), torch.empty(4096, 128256, device="meta")
    with pytest.raises(safeloss.InputError) as lin:
        safeloss.linear_cross_entropy(*meta, torch.empty(8192, dtype=torch.long, device="meta"))
    printed = catalogue + "\nsafeloss.InputError: " + str(lin.value)
    for block in blocks:
        for line in block.strip().splitlines():
            for part in line.split("..."):
                assert part.strip(" ;").removeprefix("safeloss.") in printed, part


@pytest.mark.parametrize("extras", [{}, {"z_loss": 1e-4}])
def test_linear_reduction_error_names_linear_cross_entropy(extras):
    """It read "reduction='avg' is not a valid reduction for cross_entropy"."""
    with pytest.raises(safeloss.ReductionError, match="not a valid reduction for linear_cross_entropy") as e:
        safeloss.linear_cross_entropy(torch.randn(6, 8), torch.randn(5, 8), torch.randint(0, 5, (6,)),
                                      reduction="avg", **extras)
    assert not re.search(r"(?<![\w.])cross_entropy\b", str(e.value))
    with pytest.raises(safeloss.ReductionError, match="for SafeLinearCrossEntropyLoss"):
        safeloss.SafeLinearCrossEntropyLoss(8, 5, reduction="avg")


def test_masked_logits_with_label_smoothing_get_a_fix_that_keeps_the_loss_sane():
    """-inf masks with label smoothing: the fix was a finite mask, torch.finfo(dtype).min / 2,
    which gives a loss of ~5.7e36 there (smoothing puts label_smoothing / C on the masked class)."""
    x = torch.tensor([[-math.inf, 1.0, 2.0], [0.5, 1.0, -math.inf]])
    t = torch.tensor([1, 0])
    text = _message(lambda: safeloss.cross_entropy(x, t, label_smoothing=0.1))
    assert "probability targets that are 0 on the masked classes" in _fix(text) or \
        "probability targets that are 0 on the masked classes" in text
    # What it asks for: smoothing over the allowed classes, a finite mask.
    allowed = torch.isfinite(x)
    probs = 0.9 * F.one_hot(t, 3) + 0.1 * allowed / allowed.sum(1, keepdim=True)
    masked = x.masked_fill(~allowed, torch.finfo(x.dtype).min / 2)
    out = _quiet(lambda: safeloss.cross_entropy(masked, probs))
    assert out.item() < 10
    assert_matches(out, F.cross_entropy(masked, probs))


def test_masked_logits_with_probability_targets_say_nan_where_the_target_is_zero():
    x = torch.tensor([[-math.inf, 1.0, 2.0]])
    target = torch.tensor([[0.0, 0.5, 0.5]])
    assert math.isnan(F.cross_entropy(x, target).item())
    text = _message(lambda: safeloss.cross_entropy(x, target))
    assert "NaN where the probability target is 0 on that class" in text
    fixed = x.masked_fill(torch.isinf(x), torch.finfo(x.dtype).min / 2)
    assert_matches(_quiet(lambda: safeloss.cross_entropy(fixed, target)), F.cross_entropy(fixed, target))


@pytest.mark.parametrize("call, where", [
    (lambda: safeloss.cross_entropy(torch.randn(4, 5), torch.tensor([0.0, 1.5, 2.0, math.nan])), "1.5 at [1] and nan at [3]"),
    (lambda: safeloss.cross_entropy(torch.randn(2, 3), torch.tensor([[1, 1, 0], [0, 1, 0]])), "(first at [0])"),
])
def test_positions_are_written_as_every_other_message_writes_them(call, where):
    """Positions read "[1]" everywhere (bad labels, NaN rows); these two wrote tuples, "(1,)"."""
    assert where in _message(call)


@pytest.mark.usefixtures("clean_patch")
def test_label_smoother_route_fix_changes_the_labels_it_can_reach():
    """transformers' LabelSmoother (built by the Trainer): its fix said
    "cross_entropy(..., ignore_index=-1)", a call its users never write."""
    pytest.importorskip("transformers")
    from transformers.trainer_pt_utils import LabelSmoother

    logits = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[0, 1, -1, -1], [1, 2, -1, -1]])
    smoother = LabelSmoother(epsilon=0.1)
    with safeloss.patch():
        text = _message(lambda: smoother({"logits": logits}, labels))
    fix = _fix(text).split("\n(transformers", 1)[0]
    assert "cross_entropy(..., ignore_index" not in fix, fix
    fixed = _run(_code(text, "labels.masked_fill("), labels=labels)
    want = smoother({"logits": logits}, fixed)  # transformers' own code, unpatched
    with safeloss.patch():
        assert_matches(smoother({"logits": logits}, fixed), want)


@pytest.mark.parametrize("transform", ["vmap", "grad"])
def test_linear_bad_label_under_a_transform_names_the_class_stock_raises(transform):
    """Under vmap stock raises a RuntimeError (its batched gather), and so does this call: the
    message said "Stock torch raises IndexError there too"."""
    w = torch.randn(5, 8)
    x, t = torch.randn(3, 6, 8), torch.tensor([[0, 1, 7, 1, 1, 1]] * 3)
    if transform == "vmap":
        def run(f):
            return torch.func.vmap(lambda a, b: f(a, w, b))(x, t)
    else:
        def run(f):
            return torch.func.grad(lambda a: f(a, w, t[0]))(x[0])
    with pytest.raises(Exception) as stock:
        run(F.linear_cross_entropy)
    with pytest.raises(safeloss.TargetOutOfRangeError) as ours:
        run(safeloss.linear_cross_entropy)
    assert isinstance(ours.value, type(stock.value))
    assert f"Stock torch raises {type(stock.value).__name__} there too" in str(ours.value)


@pytest.mark.parametrize("extras", [{}, {"z_loss": 1e-4}])
def test_module_reduction_error_names_the_module(extras):
    """SafeCrossEntropyLoss(reduction='avg') said "not a valid reduction for cross_entropy", a
    function the user did not call; so did a reduction reassigned on the module later."""
    with pytest.raises(safeloss.ReductionError, match="not a valid reduction for SafeCrossEntropyLoss"):
        safeloss.SafeCrossEntropyLoss(reduction="avg", **extras)
    m = safeloss.SafeCrossEntropyLoss(**extras)
    m.reduction = "Mean"
    with pytest.raises(safeloss.ReductionError, match=r"for SafeCrossEntropyLoss\.[\s\S]*lower-case"):
        m(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]))
