"""Every hint rule, with inputs on both sides of it: a hint names a cause only where the inputs
show the evidence for it (the values, their positions, shapes, dtypes), and says less where
they do not."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
import torch.nn.functional as F

import safeloss

pytestmark = pytest.mark.usefixtures("clean_patch")


def _g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def oob(x: torch.Tensor, t: torch.Tensor, **kw) -> str:
    with pytest.raises(safeloss.TargetOutOfRangeError) as e:
        safeloss.cross_entropy(x, t, **kw)
    return str(e.value)


def lm_labels(B: int = 4, T: int = 12, V: int = 50, pad: int | None = None, lengths=(12, 7, 9, 5)):
    t = torch.randint(1, V, (B, T), generator=_g(1))
    if pad is not None:
        for b, n in enumerate(lengths[:B]):
            t[b, n:] = pad
    return t


# ------------------------------------------------------------------ padding vs 1-based


@pytest.mark.parametrize("flatten", ["2-D", "view", "hf-shift"])
def test_pad_id_equal_to_vocab_size_is_called_padding(flatten):
    V = 50
    labels = lm_labels(V=V, pad=V)
    x = torch.randn(4, 12, V, generator=_g())
    if flatten == "2-D":
        msg = oob(x.transpose(1, 2), labels)
    elif flatten == "view":
        msg = oob(x.reshape(-1, V), labels.view(-1))
    else:  # Hugging Face's ForCausalLMLoss: pad with -100, shift, flatten a contiguous copy
        shifted = F.pad(labels, (0, 1), value=-100)[..., 1:].contiguous()
        msg = oob(x.reshape(-1, V), shifted.view(-1))
    assert f"Every bad value is {V}, and it fills the end of 3 of 4 rows" in msg
    assert "pad token id equal to the vocabulary size" in msg
    assert f"ignore_index={V}" in msg
    assert "1-based" not in msg


def test_a_value_that_also_occurs_mid_row_is_not_padding():
    V = 50
    labels = lm_labels(V=V, pad=V)
    labels[0, 3] = V  # mid-row: a real label, so not a padding pattern
    msg = oob(torch.randn(4, V, 12), labels)
    assert "padding value" not in msg
    # 0 missing means little when 50 is 16 of 48 labels: no 1-based claim, and the reason why
    assert "look 1-based" not in msg and "50 occurs 16 times and no other label more than" in msg
    # nor when 32 labels of 500 classes cover too little of 1..500 for 0's absence to count
    msg = oob(torch.randn(4, 500, 8), torch.randint(1, 500, (4, 8)).index_fill_(1, torch.tensor([7]), 500))
    assert "look 1-based" not in msg and "too few of the 500 classes to tell" in msg


@pytest.mark.parametrize("n_pad", [2, 3])
def test_padding_needs_more_than_two_positions(n_pad):
    V = 50
    labels = lm_labels(B=1, T=12, V=V, pad=V, lengths=(12 - n_pad,))
    msg = oob(torch.randn(1, V, 12), labels)
    assert ("padding value" in msg) == (n_pad >= 3)


def test_left_padding_is_found_too():
    labels = lm_labels(V=9, pad=None).clamp(max=8)
    labels[1:, :3] = 9
    msg = oob(torch.randn(4, 9, 12), labels)
    assert "fills the start of 3 of 4 rows" in msg and "ignore_index=9" in msg


def test_image_masks_are_not_read_as_sequences():
    t = torch.zeros(2, 4, 4, dtype=torch.long)
    t[:, :, 3] = 255  # a column of void pixels: row ends, but these rows are image rows
    msg = oob(torch.randn(2, 3, 4, 4), t)
    assert "padding value" not in msg and "mask code for 'void'" in msg


def test_one_based_needs_labels_covering_1_to_C():
    t = torch.arange(1, 11).repeat(3)  # all of 1..10 for 10 classes, 0 never
    msg = oob(torch.randn(30, 10), t)
    assert "look 1-based: they run from 1 to 10, 10 of the 10 values 1..10 occur, and 0 never does" in msg
    t = torch.tensor([1, 10, 3])  # 3 labels of 10 classes: no evidence either way
    msg = oob(torch.randn(3, 10), t)
    assert "look 1-based" not in msg and "as with 1-based labels" in msg and "too few" in msg


def test_one_based_wins_over_a_short_trailing_run_in_a_flat_target():
    msg = oob(torch.randn(6, 5), torch.tensor([1, 2, 3, 4, 5, 5]))
    assert "look 1-based" in msg and "padding value" not in msg


# ------------------------------------------------------------------ single codes, negatives, far labels


def test_a_negative_value_needs_no_pattern():
    msg = oob(torch.randn(4, 3), torch.tensor([0, -1, 2, 1]))
    assert "Every bad value is -1, which looks like padding/unknown labels (a label is never negative)" in msg
    msg = oob(torch.randn(4, 3), torch.tensor([0, -1, -2, 1]))
    assert "Every bad value" not in msg and "2 different negative values" in msg


def test_255_in_a_mask_vs_in_flat_labels_vs_with_other_bad_values():
    mask = torch.zeros(2, 4, 4, dtype=torch.long)
    mask[0, 1, 2] = 255
    assert "mask code for 'void' / unlabeled pixels" in oob(torch.randn(2, 3, 4, 4), mask)
    flat = oob(torch.randn(4, 3), torch.tensor([0, 255, 2, 1]))
    assert "what -1 becomes in uint8" in flat and "pixels" not in flat
    both = oob(torch.randn(4, 3), torch.tensor([0, 255, 7, 1]))
    assert "Every bad value" not in both


def test_far_labels_are_called_corrupt_only_when_far():
    assert "corrupt or uninitialized" in oob(torch.randn(3, 5), torch.tensor([0, 1, 10**6]))
    near = oob(torch.randn(3, 5), torch.tensor([0, 1, 7]))
    assert "corrupt" not in near and "final layer is too small" in near


def test_negatives_mixed_with_too_large_labels_are_named():
    msg = oob(torch.randn(3, 5), torch.tensor([-3, 1, 7]))
    assert "go up to 7" in msg and "negative labels (-3) are never classes" in msg


def test_single_output_model():
    assert "single output (class 0 only)" in oob(torch.randn(3, 1), torch.tensor([0, 1, 1]))


# ------------------------------------------------------------------ positions of a flattened target


def test_positions_of_a_flattened_view_are_mapped_back():
    labels = torch.zeros(3, 5, dtype=torch.long)
    labels[2, 3] = 9
    msg = oob(torch.randn(15, 4), labels.view(-1))
    assert "9 at [13] (= [2, 3])" in msg and "flattened target: it is a view of a (3, 5) tensor" in msg
    msg = oob(torch.randn(15, 4), labels.view(-1).clone())  # a copy: nothing to map back to
    assert "(= [" not in msg and "flattened" not in msg


def test_a_library_caller_is_named_for_its_flat_target():
    """Code in an installed package that flattens the labels itself (as Transformers does)."""
    fake = "/opt/venv/lib/python3.11/site-packages/fancylib/losses.py"
    code = compile("def loss(x, t):\n    return safeloss.cross_entropy(x, t.reshape(-1).clone())\n", fake, "exec")
    ns: dict[str, object] = {"safeloss": safeloss}
    exec(code, ns)
    labels = torch.zeros(3, 5, dtype=torch.long)
    labels[1, 1] = 9
    with pytest.raises(safeloss.TargetOutOfRangeError) as e:
        ns["loss"](torch.randn(15, 4), labels)  # type: ignore[operator]
    assert "the 1-D target that fancylib/losses.py:2 passed to the loss" in str(e.value)
    assert "passed to the loss" not in oob(torch.randn(15, 4), labels.reshape(-1).clone())


# ------------------------------------------------------------------ shapes


@pytest.mark.parametrize("ishape, tshape", [((4, 3), (4, 1)), ((2, 3, 5, 5), (2, 1, 5, 5)),
                                            ((2, 3, 5), (2, 1, 5)), ((2, 3, 4, 4, 4), (2, 1, 4, 4, 4))])
def test_squeezed_target_quotes_stocks_own_error_and_squeeze_1(ishape, tshape):
    x, t = torch.randn(*ishape), torch.zeros(*tshape, dtype=torch.long)
    with pytest.raises(RuntimeError) as stock:
        F.cross_entropy(x, t)
    with pytest.raises(safeloss.TargetShapeError) as e:
        safeloss.cross_entropy(x, t, strict=True)
    msg = str(e.value)
    assert f'Stock torch raises "{stock.value}"' in msg
    assert "target.squeeze(1)" in msg and "view(-1)" not in msg


def _ntc_fix(call) -> str:
    with pytest.raises(safeloss.TargetShapeError) as e:
        call(torch.randn(2, 7, 5), torch.randint(0, 5, (2, 7)))
    return next(line for line in str(e.value).splitlines() if line.startswith("Fix:"))


def test_fix_text_names_the_call_that_was_made():
    assert _ntc_fix(safeloss.cross_entropy).startswith("Fix: safeloss.cross_entropy(logits.transpose(1, 2)")
    assert _ntc_fix(safeloss.SafeCrossEntropyLoss()).startswith("Fix: loss_fn(logits.transpose(1, 2)")
    with safeloss.patch():
        assert _ntc_fix(F.cross_entropy).startswith("Fix: F.cross_entropy(logits.transpose(1, 2)")
        assert _ntc_fix(torch.nn.CrossEntropyLoss()).startswith("Fix: loss_fn(")


@pytest.mark.parametrize("target, says", [
    (torch.rand(3, 4), "read as probabilities"),
    (torch.eye(4)[:3].long(), "read as one-hot rows"),
    (torch.randint(2, 5, (3, 4)), "labels per position"),
])
def test_2d_target_with_other_columns_says_what_its_values_show(target, says):
    with pytest.raises(safeloss.TargetShapeError) as e:
        safeloss.cross_entropy(torch.randn(3, 5), target)
    msg = str(e.value)
    assert says in msg
    others = {"read as probabilities", "read as one-hot rows", "labels per position"} - {says}
    assert not any(o in msg for o in others)


def test_integer_logits_are_called_swapped_only_when_the_shapes_say_so():
    with pytest.raises(safeloss.InputDtypeError) as e:
        safeloss.cross_entropy(torch.randint(0, 5, (3,)), torch.randn(3, 5))
    assert "arguments look swapped" in str(e.value)
    with pytest.raises(safeloss.InputDtypeError) as e:
        safeloss.cross_entropy(torch.randint(0, 5, (3, 5)), torch.randint(0, 5, (3,)))
    assert "look swapped" not in str(e.value) and "if this tensor holds the labels" in str(e.value)


@pytest.mark.parametrize("n, says", [(4, "1 fewer entries than classes"), (7, "2 more entries than classes")])
def test_weight_length_cause_follows_the_direction(n, says):
    with pytest.raises(safeloss.WeightError) as e:
        safeloss.cross_entropy(torch.randn(3, 5), torch.tensor([0, 1, 2]), weight=torch.ones(n))
    assert says in str(e.value)
    assert ("bincount" in str(e.value)) == (n < 5)


def test_argument_type_error_covers_ordinary_arguments_and_the_docs_say_so():
    from pathlib import Path

    with pytest.raises(safeloss.ArgumentTypeError):
        safeloss.cross_entropy([0.1, 0.2], torch.tensor([0]))  # type: ignore[arg-type]
    with pytest.raises(safeloss.ArgumentTypeError):
        safeloss.cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]), ignore_index="x")  # type: ignore[arg-type]
    row = next(line for line in (Path(__file__).parents[1] / "docs" / "errors.md").read_text().splitlines()
               if line.startswith("| `ArgumentTypeError`"))
    assert "safeloss-only argument (" not in row and "a list as input" in row and "ignore_index" in row


# ------------------------------------------------------------------ linear + cross-entropy


def _linear_err(x, w, t, **kw) -> str:
    with pytest.raises(safeloss.SafeLossError) as e:
        safeloss.linear_cross_entropy(x, w, t, **kw)
    return str(e.value)


def test_linear_shifted_labels_are_named_only_when_the_counts_fit():
    w = torch.randn(5, 8)
    shifted = _linear_err(torch.randn(2 * 6, 8), w, torch.randint(0, 5, (2 * 5,)))
    assert "2 rows more than there are targets, and 12 = 2 x 6" in shifted
    other = _linear_err(torch.randn(12, 8), w, torch.randint(0, 5, (9,)))  # 12 % 3 == 0: 3 x 4
    assert "3 rows more" in other
    odd = _linear_err(torch.randn(12, 8), w, torch.randint(0, 5, (7,)))  # 12 % 5 != 0
    assert "rows more than there are targets" not in odd and "Possible causes" in odd


def test_linear_dtype_mismatch_names_the_narrower_side():
    t = torch.randint(0, 5, (4,))
    body = _linear_err(torch.randn(4, 8).half(), torch.randn(5, 8), t)
    assert "a likely cause (a guess): the model body was cast" in body
    head = _linear_err(torch.randn(4, 8), torch.randn(5, 8).half(), t)
    assert "the head was cast and the hidden states were not" in head


def test_linear_integer_input_hint_is_conditional():
    msg = _linear_err(torch.randint(0, 5, (4, 8)), torch.randn(5, 8), torch.randint(0, 5, (4,)))
    assert "If this tensor holds token ids or labels" in msg and "usually" not in msg


def test_messages_hold_no_generic_call_for_functional_warnings():
    """Warnings of the functional API never say loss_fn(...) (a module's call)."""
    x = torch.full((2, 3), 60000.0, dtype=torch.float16)
    x[:, 0] = -60000.0
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        safeloss.cross_entropy(x, torch.tensor([0, 0]), reduction="sum")
    texts = [str(w.message) for w in seen if issubclass(w.category, safeloss.SafeLossWarning)]
    assert texts and not any(re.search(r"\bloss_fn\(", m) for m in texts)


# ------------------------------------------------------------------ how many bad values are listed


@pytest.mark.parametrize("distinct", [1, 3, 4, 5, 6])
def test_bad_values_listed_up_to_four_then_counted(distinct: int) -> None:
    """Up to four distinct bad values are each listed; from five on, the four most common are
    listed and the rest counted ("... (5 distinct bad values)"), never one boundary off."""
    bad = [10 + i for i in range(distinct)]
    t = torch.tensor([0, 1, *bad, *bad[:1]])  # the first bad value twice: listed first
    msg = oob(torch.randn(t.numel(), 5, generator=_g()), t)
    listed = re.findall(r"(\d+) at \[", msg.split("bad values:")[1].split("\n")[0])
    assert listed[0] == "10" and sorted(map(int, listed)) == sorted(bad[: min(distinct, 4)]), msg
    counted = re.search(r"\.\.\. \((\d+) distinct bad values\)", msg)
    assert (counted is not None) == (distinct > 4), msg
    if counted:
        assert int(counted.group(1)) == distinct


# ------------------------------------------------------------------ weight dtype: which cause


def _weight_dtype_warning(x_dtype: torch.dtype, w_dtype: torch.dtype) -> str:
    x = torch.randn(4, 5, generator=_g()).to(x_dtype)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        safeloss.cross_entropy(x, torch.tensor([0, 1, 2, 3]), torch.ones(5, dtype=w_dtype))
    texts = [str(r.message) for r in rec if "weight is" in str(r.message)]
    assert len(texts) == 1, [str(r.message) for r in rec]
    return texts[0]


@pytest.mark.parametrize("x_dtype,w_dtype,numpy,converted", [
    (torch.float16, torch.float32, False, True),  # a wider weight beside half logits: .half()
    (torch.bfloat16, torch.float64, True, True),
    (torch.float16, torch.bfloat16, False, False),  # as narrow: no conversion left it behind
    (torch.bfloat16, torch.float16, False, False),
    (torch.float32, torch.float64, True, False),  # float64: NumPy, not a half conversion
    (torch.float32, torch.float16, False, False),  # a narrower weight: no guess
])
def test_weight_dtype_cause_follows_the_two_dtypes(x_dtype: torch.dtype, w_dtype: torch.dtype, numpy: bool,
                                                   converted: bool) -> None:
    text = _weight_dtype_warning(x_dtype, w_dtype)
    assert ("built from NumPy" in text) == numpy, text
    assert ("a model converted with .half()" in text) == converted, text
    assert ("likely cause" in text) == (numpy or converted), text


# ------------------------------------------------------------------ probability targets: rows


@pytest.mark.parametrize("rows", [4, 2048])  # the direct count, and the amin pass of large targets
def test_probability_target_findings_count_rows_not_entries(rows: int) -> None:
    """Rows with a negative entry are counted once however many negative entries they hold."""
    y = torch.full((rows, 5), 0.2)
    y[0] = torch.tensor([-0.3, -0.2, 0.5, 0.5, 0.5])  # three negative entries, sums to 1
    y[2] = torch.tensor([0.7, -0.1, 0.2, 0.1, 0.1])  # one
    with pytest.raises(safeloss.ProbabilityTargetError, match=r"(?s)\b2 rows with negative entries \(min -0\.3\)"):
        safeloss.cross_entropy(torch.randn(rows, 5, generator=_g()), y, strict=True)


@pytest.mark.parametrize("C,covered,one_based", [(8, 4, True), (9, 4, False), (10, 5, True), (10, 4, False)])
def test_one_based_coverage_boundary(C: int, covered: int, one_based: bool) -> None:
    """1-based needs the labels to cover at least half of 1..C: exactly half is enough."""
    values = list(range(C - covered + 1, C + 1))  # covered values, the largest exactly C
    t = torch.tensor(values * 3)
    msg = oob(torch.randn(t.numel(), C, generator=_g()), t)
    assert ("look 1-based" in msg) == one_based, msg
    assert ("too few of the" in msg) == (not one_based), msg


@pytest.mark.parametrize("extra,one_based", [(0, True), (1, False)])
def test_one_based_filler_boundary(extra: int, one_based: bool) -> None:
    """C is filler (not a 1-based class) only when it occurs more than 2 * (the most common other
    label) + 1 times: at exactly that count it is still a class."""
    C = 4
    seq = [1, C, 1, C, 2, C, 2, C, 3, C, 3]  # C 5 = 2 * 2 + 1 times, never in a run at an end
    if extra:
        seq.insert(2, C)
    t = torch.tensor(seq)
    msg = oob(torch.randn(t.numel(), C, generator=_g()), t)
    assert ("look 1-based" in msg) == one_based, msg
    assert ("more like a filler value" in msg) == (not one_based), msg


@pytest.mark.parametrize("code", [250, 254, 255, 65535, 253, 65534])
def test_mask_code_hint_names_exactly_the_usual_codes(code: int) -> None:
    """250, 254, 255 and 65535 are the usual 'no label' codes (ignore_index=code is the fix);
    a neighbouring value is just a label beyond the outputs."""
    t = torch.tensor([0, 1, code, 2, code, 3])
    msg = oob(torch.randn(6, 5, generator=_g()), t)
    usual = code in (250, 254, 255, 65535)
    assert (f"Every bad value is {code}, which looks like" in msg) == usual, msg
    assert (f"ignore_index={code})" in msg) == usual, msg


# ------------------------------------------------------------------ mutation proof: boundaries


def test_padding_needs_runs_longer_than_one():
    """Class: padding hint. A value that ends three rows once each (runs of 1) is no padding
    pattern: padding fills the end of a row with a run of at least 2 (or one row with 3)."""
    C = 9
    t = torch.tensor([[1, 2, 3, 4, 5, C], [2, 3, 4, 5, 6, C], [3, 4, 5, 6, 7, C]])
    msg = oob(torch.randn(3, C, 6, generator=_g()), t)
    assert "padding value" not in msg, msg
    t[:, 4] = C  # now runs of 2 at the end of all three rows
    assert "fills the end of 3 of 3 rows (runs of up to 2)" in oob(torch.randn(3, C, 6, generator=_g()), t)


@pytest.mark.parametrize("label, corrupt", [(5000, True), (4999, False)])
def test_far_label_boundary_is_1000_times_the_classes(label: int, corrupt: bool) -> None:
    """Class: corrupt-label hint boundary. A label of 1000 * C or more is far enough to be called
    corrupt (5 classes: 5000 is, 4999 is not), never one off."""
    msg = oob(torch.randn(3, 5, generator=_g()), torch.tensor([0, 1, label]))
    assert ("corrupt or uninitialized" in msg) == corrupt, msg
    assert ("final layer is too small" in msg) == (not corrupt), msg


@pytest.mark.parametrize("distinct, corrupt", [(1, True), (4, True), (5, False)])
def test_corrupt_label_hint_up_to_four_distinct_far_values(distinct: int, corrupt: bool) -> None:
    """Class: hint boundary (four distinct corrupt labels). Up to four distinct far labels are
    called corrupt data; five or more distinct values are no longer a few stray words of memory."""
    far = [10**6 + i for i in range(distinct)]
    t = torch.tensor([0, 1, *far])
    msg = oob(torch.randn(t.numel(), 5, generator=_g()), t)
    assert ("corrupt or uninitialized" in msg) == corrupt, msg


def test_2d_labels_with_some_zeros_and_ones_are_still_labels_per_position():
    """Class: shape-mismatch messages (one-hot detection of a 2-D target). A target is one-hot
    only if every entry is 0 or 1; per-position labels that include some 0s and 1s are labels."""
    t = torch.tensor([[0, 3, 1, 4], [1, 0, 2, 0], [4, 4, 0, 1]])
    with pytest.raises(safeloss.TargetShapeError) as e:
        safeloss.cross_entropy(torch.randn(3, 5, generator=_g()), t)
    msg = str(e.value)
    assert "labels per position" in msg and "one-hot" not in msg, msg
