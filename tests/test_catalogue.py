"""The safety catalogue: every mistake, its error or warning, in default and strict mode.

Every raise site in safeloss/validation.py and safeloss/checks.py has a test here that asserts the
exception type (safeloss's *and* the builtin stock torch raises) and the message content.
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
import torch.nn.functional as F

import safeloss
from safeloss import SafeLossError, SafeLossWarning
from tests.test_differential import CPU_BACKENDS
from tests.tolerances import assert_matches

ce = safeloss.cross_entropy


@pytest.fixture(params=CPU_BACKENDS, autouse=True)
def backend(request, monkeypatch):
    """Run the whole catalogue once per backend: the Triton kernel counts problems in-kernel,
    and must raise and warn exactly like the torch path."""
    monkeypatch.setitem(globals(), "ce", functools.partial(safeloss.cross_entropy, backend=request.param))
    return request.param


def logits(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def labels(high, *shape, seed=1):
    return torch.randint(0, high, shape, generator=torch.Generator().manual_seed(seed))


def warns_or_raises(strict, error, match):
    """Default mode: a SafeLossWarning; strict: the given SafeLossError subclass."""
    if strict:
        return pytest.raises(error, match=match)
    return pytest.warns(SafeLossWarning, match=match)


# ---------------------------------------------------------------- batch size


def test_batch_mismatch_folded_view():
    with pytest.raises(safeloss.BatchSizeMismatchError, match=r"got 8 predictions but 2 targets") as e:
        ce(logits(8, 5), labels(5, 2))
    assert isinstance(e.value, ValueError) and isinstance(e.value, SafeLossError)
    msg = str(e.value)
    assert "input  (logits) shape (8, 5)" in msg and "target (labels) shape (2,)" in msg
    assert "4x the target batch (8 = 4 x 2)" in msg and "x.flatten(1)" in msg
    # Only the ratio is known: a guess is marked as one, and no feature shape is invented.
    assert "A guess from that ratio" in msg and "features of shape" not in msg


def test_batch_mismatch_target_multiple():
    with pytest.raises(ValueError, match=r"(?s)got 2 predictions but 6 targets.*3x the input batch.*logits of shape \(6, 5\)"):
        ce(logits(2, 5), labels(5, 6))


def test_batch_mismatch_hard_coded_batch_size_hint():
    with pytest.raises(safeloss.BatchSizeMismatchError, match=r"(?s)got 32 predictions but 20 targets.*hard-coded batch size.*partial last batch itself is normal"):
        ce(logits(32, 5), labels(5, 20))


def test_batch_mismatch_kdim():
    with pytest.raises(safeloss.BatchSizeMismatchError, match=r"got 4 predictions but 2 targets"):
        ce(logits(4, 3, 8, 8), labels(3, 2, 8, 8))


def test_partial_last_batch_is_fine():
    """The seed article's 'fix' (drop_last=True) is for a problem that does not exist."""
    model = torch.nn.Linear(10, 10)
    x, y = torch.randn(100, 10), labels(10, 100)
    for xb, yb in zip(x.split(32), y.split(32)):  # last batch has 4 samples
        ce(model(xb), yb).backward()


# ---------------------------------------------------------------- layout


def test_sequence_logits_not_transposed():
    with pytest.raises(safeloss.TargetShapeError, match=r"(?s)sequence logits of shape \(N, T, C\) = \(2, 7, 5\).*transpose\(1, 2\).*reshape\(-1, 5\)") as e:
        ce(logits(2, 7, 5), labels(5, 2, 7))
    assert isinstance(e.value, RuntimeError)


def test_channels_last_logits():
    with pytest.raises(safeloss.TargetShapeError, match=r"(?s)channels-last logits \(2, 8, 8, 5\).*permute\(0, 3, 1, 2\)"):
        ce(logits(2, 8, 8, 5), labels(5, 2, 8, 8))


def test_flat_logits_with_2d_target():
    with pytest.raises(safeloss.TargetShapeError, match=r"(?s)2-D targets for 2-D logits.*target.reshape\(-1\)"):
        ce(logits(12, 5), labels(5, 3, 4))


def test_flat_target_with_3d_logits():
    with pytest.raises(safeloss.TargetShapeError, match=r"(?s)flat targets for 3-D logits.*reshape\(-1, 5\)"):
        ce(logits(2, 7, 5), labels(5, 14))


def test_flat_target_for_kdim_logits_needs_reshape():
    with pytest.raises(safeloss.TargetShapeError, match=r"(?s)flat targets for 3-D logits.*target.reshape\(2, 4\)"):
        ce(logits(2, 5, 4), labels(5, 8))


def test_onehot_with_wrong_class_count():
    with pytest.raises(safeloss.TargetShapeError, match=r"(?s)with 4 columns where the model has 5 classes.*argmax\(dim=1\)"):
        ce(logits(3, 5), torch.eye(4)[:3].long())


def test_one_sample_target_shape():
    with pytest.raises(safeloss.TargetShapeError, match=r"(?s)1-D logits \(one sample, 5 classes\).*logits of all 3 samples, shape \(3, 5\)"):
        ce(logits(5), labels(5, 3))


def test_unpairable_target_shape():
    with pytest.raises(safeloss.TargetShapeError, match=r"(?s)cannot pair this target.*class indices of shape \(2, 4\)"):
        ce(logits(2, 5, 4), labels(5, 2, 3, 3))


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("shape,tshape", [((6, 5), (6, 1)), ((2, 5, 4, 4), (2, 1, 4, 4))])
def test_singleton_target_dim_is_squeezed(strict, shape, tshape):
    x = logits(*shape)
    t = labels(5, *tshape)
    with warns_or_raises(strict, safeloss.TargetShapeError, r"(?s)squeezes the singleton dimension.*target.squeeze\(1\)"):
        out = ce(x, t, strict=strict)
    if not strict:
        assert_matches(out, F.cross_entropy(x, t.squeeze(1)))


# ---------------------------------------------------------------- target dtypes


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.int8, torch.uint8])
def test_small_integer_targets_are_accepted_silently(dtype):
    x, t = logits(6, 5), labels(5, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = ce(x, t.to(dtype), strict=True)
    assert_matches(out, F.cross_entropy(x, t))


@pytest.mark.parametrize("strict", [False, True])
def test_float_whole_number_targets_are_converted(strict):
    x, t = logits(6, 5), labels(5, 6)
    with warns_or_raises(strict, safeloss.TargetDtypeError, r"(?s)class-index targets stored as torch.float32.*target.long\(\)"):
        out = ce(x, t.float(), strict=strict)
    if not strict:
        assert_matches(out, F.cross_entropy(x, t))


def test_float_fractional_targets_error():
    t = torch.tensor([0.0, 1.5, 2.0, float("nan")])
    with pytest.raises(safeloss.TargetDtypeError, match=r"(?s)2 values with a fraction or NaN/inf: 1.5 at \[1\] and nan at \[3\]"):
        ce(logits(4, 5), t)


def test_bool_targets_error():
    with pytest.raises(safeloss.TargetDtypeError, match=r"(?s)boolean targets.*BCEWithLogitsLoss"):
        ce(logits(4, 2), torch.tensor([True, False, True, True]))


def test_complex_targets_error():
    with pytest.raises(safeloss.TargetDtypeError, match=r"complex targets"):
        ce(logits(4, 2), torch.zeros(4, dtype=torch.complex64))
    with pytest.raises(safeloss.TargetDtypeError, match=r"complex targets"):
        ce(logits(4, 2), torch.zeros(4, 2, dtype=torch.complex64))


def test_target_not_a_tensor():
    with pytest.raises(safeloss.ArgumentTypeError, match=r"(?s)got list.*torch.as_tensor") as e:
        ce(logits(2, 3), [0, 1])
    assert isinstance(e.value, TypeError)


@pytest.mark.parametrize("value", ["0.1", None, True, object()])
def test_label_smoothing_wrong_type(value):
    with pytest.raises(safeloss.ArgumentTypeError, match=r"label_smoothing must be a number between 0.0 and 1.0, got"):
        ce(logits(2, 3), labels(3, 2), label_smoothing=value)


# ---------------------------------------------------------------- one-hot / probabilities


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.bool])
def test_integer_onehot_converted(strict, dtype):
    x, t = logits(6, 5), labels(5, 6)
    w = torch.rand(5) + 0.5
    onehot = F.one_hot(t, 5).to(dtype)
    with warns_or_raises(strict, safeloss.TargetDtypeError, r"(?s)one-hot targets as torch\.\w+ \(shape \(6, 5\)\).*argmax\(dim=1\)"):
        out = ce(x, onehot, w, strict=strict)
    if not strict:
        # torch's intended result: the float one-hot (probability) semantics, weighted mean over N.
        assert_matches(out, F.cross_entropy(x, onehot.float(), w))


def test_integer_multihot_error():
    t = torch.tensor([[1, 1, 0], [0, 1, 0]])
    with pytest.raises(safeloss.TargetDtypeError, match=r"(?s)not one-hot: 1 row without exactly one 1.*BCEWithLogitsLoss"):
        ce(logits(2, 3), t)
    with pytest.raises(safeloss.TargetDtypeError, match=r"not one-hot: 1 entry other than 0/1"):
        ce(logits(2, 3), torch.tensor([[2, 0, 0], [0, 1, 0]]))


def test_float_onehot_is_valid_and_silent():
    x, t = logits(6, 5), labels(5, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = ce(x, F.one_hot(t, 5).float(), strict=True)
    assert_matches(out, F.cross_entropy(x, t))


@pytest.mark.parametrize("strict", [False, True])
def test_probability_targets_not_summing_to_one(strict):
    x = logits(4, 5)
    y = torch.rand(4, 5, generator=torch.Generator().manual_seed(3))  # rows sum to ~2.5
    with warns_or_raises(strict, safeloss.ProbabilityTargetError, r"(?s)not probability distributions: 4 rows not summing to 1 \(row sums from .* of 4.*Every entry is at least 0, so these look like counts.*a guess.*softmax\(dim=1\)"):
        out = ce(x, y, strict=strict)
    if not strict:
        assert_matches(out, F.cross_entropy(x, y))


@pytest.mark.parametrize("strict", [False, True])
def test_probability_targets_negative(strict):
    x = logits(4, 5)
    y = torch.randn(4, 5, generator=torch.Generator().manual_seed(3)).log_softmax(1).exp()
    y[0] = torch.tensor([1.2, -0.2, 0.0, 0.0, 0.0])
    with warns_or_raises(strict, safeloss.ProbabilityTargetError, r"(?s)1 row with negative entries \(min -0\.2\).*Negative entries suggest logits or log-probabilities"):
        out = ce(x, y, strict=strict)
    if not strict:
        assert_matches(out, F.cross_entropy(x, y))


def test_ignore_index_with_probability_targets():
    with pytest.raises(safeloss.IgnoreIndexError, match=r"ignore_index=3 cannot be used with probability targets") as e:
        ce(logits(4, 5), torch.rand(4, 5).softmax(1), ignore_index=3)
    assert isinstance(e.value, RuntimeError)


def test_ignore_index_not_int():
    with pytest.raises(safeloss.ArgumentTypeError, match=r"ignore_index must be an int, got 1.5") as e:
        ce(logits(4, 5), labels(5, 4), ignore_index=1.5)
    assert isinstance(e.value, TypeError)  # what stock torch raises for a wrong argument type
    with pytest.raises(safeloss.ArgumentTypeError, match=r"ignore_index must be an int, got True"):
        ce(logits(4, 5), labels(5, 4), ignore_index=True)


def test_ignore_index_int_likes_are_accepted():
    import numpy as np

    x, t = logits(6, 5), labels(5, 6)
    t[0] = 3
    for ii in (np.int64(3), torch.tensor(3)):
        assert_matches(ce(x, t, ignore_index=ii), F.cross_entropy(x, t, ignore_index=3))


# ---------------------------------------------------------------- softmaxed input


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("shape", [(8, 10), (10,), (3, 10, 4, 4), (300, 10)])
def test_softmaxed_input(strict, shape):
    x = logits(*shape).softmax(0 if len(shape) == 1 else 1)
    t = labels(10, *((shape[:1] + shape[2:]) if len(shape) > 1 else ()))
    with warns_or_raises(strict, safeloss.InputError, r"(?s)looks already softmaxed.*can never go below 1\.46.*remove the nn.Softmax"):
        out = ce(x, t, strict=strict)
    if not strict:
        assert_matches(out, F.cross_entropy(x, t))


def test_softmaxed_sampled_rows_message(backend):
    x = logits(300, 10).softmax(1)
    # Every backend checks the same 64 sampled rows (the torch path reads them once more, the
    # kernel in its loss pass), so both reach the same verdict and say the same.
    with pytest.warns(SafeLossWarning, match=r"all 64 sampled rows \(of 300\)"):
        ce(x, labels(10, 300))


@pytest.mark.parametrize("seed", range(20))
def test_no_false_alarm_on_log_softmax_or_logits(seed):
    x = logits(64, 10, seed=seed) * (seed % 5 + 0.1)
    t = labels(10, 64, seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ce(x, t, strict=True)
        ce(x.log_softmax(1), t, strict=True)  # log-softmax input is harmless: log_softmax is idempotent
        ce(torch.sigmoid(x), t, strict=True)  # in [0, 1] but rows do not sum to 1


def test_no_false_alarm_on_trained_model_logits():
    """A linear model trained to near-zero loss has confident logits; nothing must fire."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 20, generator=g)
    y = (x[:, :4].argmax(1))
    model = torch.nn.Linear(20, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(100):
            opt.zero_grad()
            loss = ce(model(x), y, strict=True)
            loss.backward()
            opt.step()
    assert loss.item() < 0.3


# ---------------------------------------------------------------- out of range


@pytest.mark.parametrize("strict", [False, True])
def test_out_of_range_one_based(strict):
    t = torch.tensor([1, 2, 3, 4, 5, 1, 2, 3, 4, 5])
    with pytest.raises(safeloss.TargetOutOfRangeError, match=r"(?s)2 of 10 targets are outside the class range 0..4 \(5 classes\).*5 at \[4\] and \[9\].*look 1-based: they run from 1 to 5.*target - 1") as e:
        ce(logits(10, 5), t, strict=strict)
    assert isinstance(e.value, IndexError)


def test_out_of_range_mask_code_255():
    t = labels(5, 2, 4, 4)
    t[0, 1, 2] = 255
    t[1, 0, 0] = 255
    with pytest.raises(safeloss.TargetOutOfRangeError, match=r"(?s)2 of 32 targets.*255 at \[0, 1, 2\] and \[1, 0, 0\].*mask code.*ignore_index=255"):
        ce(logits(2, 5, 4, 4), t)
    # ... and with the suggested fix it works and matches torch.
    x = logits(2, 5, 4, 4)
    assert_matches(ce(x, t, ignore_index=255), F.cross_entropy(x, t, ignore_index=255))


def test_out_of_range_padding_minus_one():
    t = torch.tensor([0, 1, -1, -1])
    with pytest.raises(safeloss.TargetOutOfRangeError, match=r"(?s)Every bad value is -1.*padding.*ignore_index=-1"):
        ce(logits(4, 3), t)


def test_out_of_range_single_output():
    """One output with 0/1 labels: one message (the error), one fix, no second warning."""
    fix = "Fix: torch.nn.BCEWithLogitsLoss with one output and target.float(), or give the model 2 outputs and keep CrossEntropyLoss"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(safeloss.TargetOutOfRangeError, match=r"(?s)class range 0..0 \(1 class\).*single output \(class 0 only\), but the labels go up to 1") as e:
            ce(logits(4, 1), torch.tensor([0, 1, 1, 0]))
    assert str(e.value).endswith(fix)
    assert [str(w.message) for w in caught] == []
    # Strict mode: the same single error.
    with pytest.raises(safeloss.TargetOutOfRangeError, match="single output") as e:
        ce(logits(4, 1), torch.tensor([0, 1, 1, 0]), strict=True)
    assert str(e.value).endswith(fix)
    # Labels all 0 (or ignored): nothing is out of range, the single-output warning carries the same fix.
    with pytest.warns(SafeLossWarning, match="single class") as w:
        ce(logits(4, 1), torch.tensor([0, 0, -100, 0]))
    assert str(w[0].message).endswith(fix)


def test_out_of_range_too_few_outputs():
    t = torch.tensor([0, 3, 7, 9, 9])
    with pytest.raises(safeloss.TargetOutOfRangeError, match=r"(?s)4 of 5 targets.*9 at \[3\] and \[4\]; 3 at \[1\]; 7 at \[2\].*go up to 9 but the model outputs 3 scores \(classes 0..2\).*at least 10 classes.*not numbered 0..C-1.*nn.Linear\(d, 10\)"):
        ce(logits(5, 3), t)


def test_out_of_range_other_negative():
    with pytest.raises(safeloss.TargetOutOfRangeError, match=r"(?s)-7 at \[1\].*-3 at \[0\].*only allowed when they equal ignore_index"):
        ce(logits(3, 3), torch.tensor([-3, -7, 1]))


def test_out_of_range_counts_many_positions():
    t = torch.full((100,), 12)
    with pytest.raises(safeloss.TargetOutOfRangeError, match=r"(?s)100 of 100 targets.*12 at \[0\], \[1\], \[2\], \.\.\. \(100 in all\)"):
        ce(logits(100, 10), t)


def test_out_of_range_with_in_range_ignore_index_and_weight():
    with pytest.raises(safeloss.TargetOutOfRangeError, match=r"1 of 4 targets"):
        ce(logits(4, 3), torch.tensor([0, 1, 2, 3]), torch.ones(3), ignore_index=1, label_smoothing=0.1)


# ---------------------------------------------------------------- non-finite


@pytest.mark.parametrize("strict", [False, True])
def test_nonfinite_logits(strict):
    x = logits(6, 5)
    x[2, 3] = float("nan")
    x[4, 0] = float("inf")
    t = labels(5, 6)
    with warns_or_raises(strict, safeloss.NonFiniteError, r"(?s)NaN or infinite at 2 of 6 positions \(first at \[2\] and \[4\]\).*1 row with NaN, 1 row with \+inf.*clip_grad_norm_"):
        out = ce(x, t, strict=strict)
    if not strict:
        assert_matches(out, F.cross_entropy(x, t))


@pytest.mark.parametrize("red", ["mean", "sum", "none"])
def test_minus_inf_masking_is_fine(red):
    x = logits(6, 5)
    t = labels(4, 6)
    x[:, 4] = float("-inf")  # a masked-out class that no target uses
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = ce(x, t, reduction=red, strict=True)
    assert_matches(out, F.cross_entropy(x, t, reduction=red))


def test_minus_inf_on_target_class_is_reported():
    x = logits(3, 5)
    t = torch.tensor([0, 1, 2])
    x[1, 1] = float("-inf")
    with pytest.raises(safeloss.NonFiniteError, match=r"(?s)at 1 of 3 positions \(first at \[1\]\).*1 row with -inf.*never on the target class"):
        ce(x, t, strict=True)


def test_nonfinite_half_hint():
    x = logits(3, 5).half()
    x[0, 0] = float("inf")
    with pytest.raises(safeloss.NonFiniteError, match=r"(?s)float16 overflow.*GradScaler"):
        ce(x, torch.tensor([0, 1, 2]), strict=True)


# ---------------------------------------------------------------- empty / all ignored


@pytest.mark.parametrize("strict", [False, True])
def test_empty_batch_mean(strict):
    with warns_or_raises(strict, safeloss.EmptyBatchError, r"(?s)empty batch \(input shape \(0, 5\)\).*NaN.*reduction=\"sum\""):
        out = ce(logits(0, 5), torch.zeros(0, dtype=torch.long), strict=strict)
    if not strict:
        assert torch.isnan(out)


@pytest.mark.parametrize("strict", [False, True])
def test_all_ignored_mean(strict):
    t = torch.full((4,), -100)
    with warns_or_raises(strict, safeloss.EmptyBatchError, r"(?s)all 4 targets equal ignore_index=-100.*padding-only micro-batches"):
        out = ce(logits(4, 5), t, strict=strict)
    if not strict:
        assert torch.isnan(out)


def test_zero_total_weight_mean():
    with pytest.raises(safeloss.EmptyBatchError, match=r"(?s)all 2 targets that are not ignore_index=-100 have class weight 0 \(class 0\).*gradients are NaN too"):
        ce(logits(2, 3), torch.tensor([0, 0]), torch.tensor([0.0, 1.0, 1.0]), strict=True)


def test_all_ignored_sum_is_silent():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = ce(logits(4, 5), torch.full((4,), -100), reduction="sum", strict=True)
    assert out.item() == 0


# ---------------------------------------------------------------- weight


def test_weight_wrong_length():
    with pytest.raises(safeloss.WeightError, match=r"(?s)weight has shape \(4,\) but the input has 5 classes.*torch.ones\(5\)") as e:
        ce(logits(3, 5), labels(5, 3), torch.ones(4))
    assert isinstance(e.value, RuntimeError)


def test_weight_not_a_tensor_or_not_float():
    with pytest.raises(safeloss.ArgumentTypeError, match=r"got list"):
        ce(logits(3, 5), labels(5, 3), [1.0] * 5)
    with pytest.raises(safeloss.WeightError, match=r"must be floating point, got dtype torch.int64"):
        ce(logits(3, 5), labels(5, 3), torch.ones(5, dtype=torch.long))


def test_weight_wrong_device():
    with pytest.raises(safeloss.DeviceMismatchError, match=r"(?s)input is on cpu, weight is on meta.*weight = weight.to\(input.device\)"):
        ce(logits(3, 5), labels(5, 3), torch.ones(5, device="meta"))
    with pytest.raises(safeloss.DeviceMismatchError) as e:
        ce(logits(3, 5), labels(5, 3), torch.ones(5, device="meta"))
    # The cause named is the weight's, not the labels'.
    assert "class weight stays where it was built" in str(e.value) and "DataLoader" not in str(e.value)


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("wdtype,name", [(torch.float64, "Double"), (torch.float16, "Half")])
def test_weight_other_float_dtype_is_cast(wdtype, name, strict):
    """Stock torch rejects the mix with class indices; default mode casts (a listed conversion)."""
    x, t = logits(6, 5), labels(5, 6)
    w = torch.rand(5, dtype=torch.float64).to(wdtype) + 0.5
    match = rf"(?s)weight is {wdtype} but the logits are torch.float32.*expected scalar type Float but found {name}.*casts the weight to torch.float32.*weight.to\(torch.float32\)"
    with warns_or_raises(strict, safeloss.WeightError, match):
        out = ce(x, t, w, strict=strict)
    if not strict:
        assert_matches(out, F.cross_entropy(x, t, w.float()))


@pytest.mark.parametrize("strict", [False, True])
def test_weight_negative(strict):
    w = torch.tensor([1.0, -0.5, 1.0, -2.0, 1.0])
    x, t = logits(6, 5), labels(5, 6)
    with warns_or_raises(strict, safeloss.WeightError, r"(?s)2 negative entries \(classes 1 and 3\).*non-negative"):
        out = ce(x, t, w.clone(), strict=strict)
    if not strict:
        assert_matches(out, F.cross_entropy(x, t, w))


# ---------------------------------------------------------------- arguments


@pytest.mark.parametrize("eps,hint", [(-0.1, "silently treats a negative value as 0.0"), (1.5, ""), (10, "percentage, label_smoothing=0.1"), (float("nan"), "")])
def test_label_smoothing_out_of_range(eps, hint):
    with pytest.raises(safeloss.LabelSmoothingError, match=r"label_smoothing must be between 0.0 and 1.0") as e:
        ce(logits(3, 5), labels(5, 3), label_smoothing=eps)
    assert hint in str(e.value) and isinstance(e.value, RuntimeError)
    with pytest.raises(safeloss.LabelSmoothingError, match=r"between 0.0 and 1.0"):
        safeloss.SafeCrossEntropyLoss(label_smoothing=eps)


def test_invalid_reduction_fails_at_construction():
    with pytest.raises(safeloss.ReductionError, match=r"(?s)reduction='avg' is not a valid reduction.*\"mean\"") as e:
        safeloss.SafeCrossEntropyLoss(reduction="avg")
    assert isinstance(e.value, ValueError)
    with pytest.raises(safeloss.ReductionError, match=r"reduction names are lower-case"):
        ce(logits(3, 5), labels(5, 3), reduction="Mean")


def test_integer_logits():
    with pytest.raises(safeloss.InputDtypeError, match=r"(?s)integer or non-real logits: input dtype torch.int64.*if this tensor holds the labels, the logits go first") as e:
        ce(labels(5, 3, 5), labels(5, 3))
    assert isinstance(e.value, NotImplementedError) and "look swapped" not in str(e.value)
    with pytest.raises(safeloss.InputDtypeError, match=r"(?s)arguments look swapped.*logits first"):
        ce(labels(5, 3), logits(3, 5))


def test_input_not_a_tensor_or_0d():
    with pytest.raises(safeloss.ArgumentTypeError, match=r"expects the input \(logits\) to be a torch.Tensor, got list"):
        ce([0.1, 0.2], labels(2, 1))
    with pytest.raises(safeloss.InputError, match=r"0-d input"):
        ce(torch.tensor(1.0), torch.tensor(0))


def test_target_on_other_device():
    with pytest.raises(safeloss.DeviceMismatchError, match=r"(?s)input is on cpu, target is on meta.*target = target.to\(input.device\)"):
        ce(logits(3, 5), torch.zeros(3, dtype=torch.long, device="meta"))
    with pytest.raises(safeloss.DeviceMismatchError) as e:
        ce(logits(3, 5), torch.zeros(3, dtype=torch.long, device="meta"))
    assert "labels were made on meta and not moved" in str(e.value) and "weight" not in str(e.value)
    # Logits on an accelerator (meta stands in), labels left on the CPU: the DataLoader case.
    with pytest.raises(safeloss.DeviceMismatchError, match=r"(?s)input is on meta, target is on cpu.*still on the CPU, where a DataLoader"):
        ce(torch.empty(3, 5, device="meta"), labels(5, 3))


@pytest.mark.parametrize("strict", [False, True])
def test_single_class_warning(strict):
    with warns_or_raises(strict, safeloss.InputError, r"(?s)single class.*always 0.*BCEWithLogitsLoss"):
        out = ce(logits(4, 1), torch.zeros(4, dtype=torch.long), strict=strict)
    if not strict:
        assert out.item() == 0


def test_every_error_is_a_safeloss_error_and_a_builtin():
    for cls in [getattr(safeloss, n) for n in safeloss.__all__ if n.endswith("Error") and n != "SafeLossError"]:
        assert issubclass(cls, SafeLossError)
        assert issubclass(cls, (ValueError, IndexError, RuntimeError, TypeError)), cls
        assert cls.__module__ == "safeloss"


def test_weight_check_is_cached_per_version_but_reported_every_time():
    x, t = logits(6, 5), labels(5, 6)
    w = torch.ones(5)
    ce(x, t, w, strict=True)  # clean: checked once
    w[2] = -1.0  # an in-place change bumps the version: checked again
    with pytest.raises(safeloss.WeightError, match=r"1 negative entry \(classes 2\)"):
        ce(x, t, w, strict=True)
    with pytest.warns(SafeLossWarning, match="negative entry"):
        ce(x, t, w)
    with pytest.raises(safeloss.WeightError, match="negative entry"):  # cached, still reported
        ce(x, t, w, strict=True)



def test_inference_mode_weight():
    with torch.inference_mode():
        w = torch.tensor([1.0, -1.0, 1.0, 1.0, 1.0])
    x, t = logits(4, 5), labels(5, 4)
    with pytest.warns(SafeLossWarning, match="1 negative entry"):
        assert_matches(ce(x, t, w), F.cross_entropy(x, t, w))


def test_one_element_target_for_one_sample():
    x = logits(5)
    for red in ("mean", "sum", "none"):
        assert_matches(ce(x, torch.tensor([1]), reduction=red), F.cross_entropy(x, torch.tensor([1]), reduction=red))


@pytest.mark.parametrize("dtype,value,ignore_index", [(torch.uint8, 156, -100), (torch.int8, -1, 255), (torch.int16, 3000, 100000)])
def test_narrow_target_dtypes_never_wrap_ignore_index(dtype, value, ignore_index):
    """-100 as uint8 is 156: a naive comparison would treat class 156 as ignored, or miss it as bad."""
    t = torch.tensor([0, 1, value, 2], dtype=dtype)
    with pytest.raises(safeloss.TargetOutOfRangeError, match=rf"1 of 4 targets.*\n  bad values: {value} at \[2\]"):
        ce(logits(4, 5), t, ignore_index=ignore_index)
    if value >= 0:  # with enough classes the same labels are valid, and match stock torch
        x = logits(4, 4000)
        assert_matches(ce(x, t, ignore_index=ignore_index), F.cross_entropy(x, t.long(), ignore_index=ignore_index))


def test_weight_requiring_grad_with_index_targets():
    w = (torch.rand(5) + 0.5).requires_grad_()
    with pytest.raises(safeloss.WeightError, match=r"(?s)not differentiable with respect to the class weights.*weight.detach\(\)"):
        ce(logits(4, 5), labels(5, 4), w)
    with torch.no_grad():
        ce(logits(4, 5), labels(5, 4), w)  # no graph, nothing to differentiate: fine


def test_soft_labels_from_half_precision_are_not_flagged():
    for dtype in (torch.bfloat16, torch.float16):
        y = torch.randn(64, 1000, generator=torch.Generator().manual_seed(0)).to(dtype).softmax(-1).float()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ce(logits(64, 1000), y, strict=True)


def test_nonfinite_message_when_the_logits_are_finite():
    x = logits(3, 5)
    w = torch.tensor([1.0, float("inf"), 1.0, 1.0, 1.0])
    with pytest.raises(safeloss.NonFiniteError, match=r"at 1 of 3 positions \(first at \[1\]\), because the class weight is not finite \(classes 1\)\."):
        ce(x, torch.tensor([0, 1, 2]), w, reduction="none", strict=True)


def test_minus_inf_with_label_smoothing_is_explained():
    x = logits(3, 5)
    x[:, 4] = float("-inf")
    with pytest.raises(safeloss.NonFiniteError, match=r"with label smoothing or probability targets every class enters the loss"):
        ce(x, torch.tensor([0, 1, 2]), label_smoothing=0.1, strict=True)


def test_zero_classes():
    with pytest.raises(safeloss.TargetOutOfRangeError, match=r"(?s)class range: the logits have 0 classes, so no label is in range\..*no classes at all"):
        ce(torch.randn(4, 0), torch.zeros(4, dtype=torch.long))
