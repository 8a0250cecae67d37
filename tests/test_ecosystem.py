"""safeloss inside code nobody here wrote: Hugging Face Transformers, torch.compile, autocast, DDP.

All on CPU, offline and small. Transformers is optional (``pip install transformers``); its tests
skip without it.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import safeloss
from safeloss.patch import patch

# The module itself (the name safeloss.patch may be the function once exported there).
sp = importlib.import_module("safeloss.patch")

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a tiny model built from a config: never download
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("clean_patch")  # tests/conftest.py


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 5))


# =============================================================================== Hugging Face


@pytest.fixture(scope="module")
def tiny_llama() -> Any:
    transformers = pytest.importorskip("transformers")
    return transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
    )


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (3, 10), generator=g)
    labels = ids.clone()
    labels[0, 6:] = -100  # right padding
    labels[2, :3] = -100  # a masked prompt
    return ids, labels


def _train_llama(config: Any, patched: bool, num_items: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ids, labels = _batch()
    # Trainer passes the number of real target tokens of the whole (accumulated) batch: the loss
    # then runs with reduction="sum" and is divided by it.
    extra = {"num_items_in_batch": (labels[:, 1:] != -100).sum()} if num_items else {}
    losses, grads = [], []
    with patch() if patched else contextlib.nullcontext():
        for _ in range(3):
            loss = model(input_ids=ids, labels=labels, **extra).loss
            loss.backward()
            losses.append(loss.detach())
            grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
            opt.step()
            opt.zero_grad()
    return losses, grads


@pytest.mark.parametrize("num_items", [True, False], ids=["sum+num_items_in_batch", "mean"])
def test_hf_causal_lm_training_same_with_and_without_patch(
    tiny_llama: Any, num_items: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[dict[str, Any]] = []
    real = sp._safe_cross_entropy

    def spy(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append({"ignore_index": args[4], "reduction": args[6]})
        return real(*args, **kwargs)

    monkeypatch.setattr(sp, "_safe_cross_entropy", spy)
    stock = _train_llama(tiny_llama, patched=False, num_items=num_items)
    assert calls == []
    safe = _train_llama(tiny_llama, patched=True, num_items=num_items)
    # Transformers' own loss path really went through safeloss, with its own arguments.
    assert calls == [{"ignore_index": -100, "reduction": "sum" if num_items else "mean"}] * 3
    # Same numbers: the gradients bit for bit; the loss up to float32 summation order (1 ulp).
    for got, want in zip(safe[1], stock[1]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(safe[0], stock[0], rtol=1e-6, atol=0)


def test_hf_label_bug_raises_safeloss_error(tiny_llama: Any) -> None:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(tiny_llama)
    ids, labels = _batch()
    labels[1, 4] = 70  # a token id from a bigger tokenizer than the model's vocabulary (64)
    with pytest.raises(IndexError, match="Target 70 is out of bounds") as info:
        model(input_ids=ids, labels=labels)
    assert not isinstance(info.value, safeloss.SafeLossError)  # stock: opaque, no position, no fix
    with patch(), pytest.raises(safeloss.TargetOutOfRangeError) as info:
        model(input_ids=ids, labels=labels)
    msg = str(info.value)
    assert "outside the class range 0..63 (64 classes)" in msg
    assert "bad values: 70 at [13]" in msg  # position in the shifted, flattened labels
    assert "the model outputs 64 scores" in msg


# =============================================================================== torch.compile

# Under torch.compile the core validates shapes and dtypes at trace time, as in eager (same
# errors); value checks (label range, softmaxed input, NaN) cannot read the host without a graph
# break, so compiled code masks bad labels (NaN loss, never an out-of-bounds read) and does not
# report them. The clean path traces with fullgraph=True.


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # inductor's import
def test_compiled_training_step_matches_eager() -> None:
    torch._dynamo.reset()
    x = torch.randn(12, 8, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, -100, 4, 0, 1, 2, 3, 4, 0, 1])

    def train(compiled: bool) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
        model = _mlp()
        loss_fn = safeloss.SafeCrossEntropyLoss(label_smoothing=0.1, strict=True)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)

        def forward(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return loss_fn(model(x), y)

        step = torch.compile(forward, fullgraph=True) if compiled else forward  # CPU inductor
        out = []
        for _ in range(3):
            loss = step(x, y)
            loss.backward()
            out.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
            opt.step()
            opt.zero_grad()
        return out

    eager, compiled = train(False), train(True)
    for (l1, g1), (l2, g2) in zip(eager, compiled):
        torch.testing.assert_close(l2, l1)
        torch.testing.assert_close(g2, g1)


def test_shape_error_same_under_compile() -> None:
    torch._dynamo.reset()
    loss_fn = safeloss.SafeCrossEntropyLoss()

    def f(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return loss_fn(x, y)

    x, y = torch.randn(8, 5), torch.randint(0, 5, (6,))
    with pytest.raises(safeloss.BatchSizeMismatchError, match="got 8 predictions but 6 targets") as eager:
        f(x, y)
    with pytest.raises(safeloss.BatchSizeMismatchError, match="got 8 predictions but 6 targets") as compiled:
        torch.compile(f)(x, y)
    assert str(compiled.value) == str(eager.value)
    assert isinstance(compiled.value, ValueError)  # still what stock torch raises
    # fullgraph=True: Dynamo refuses to let any exception leave the graph; it reports safeloss's
    # message inside its own "Observed exception" error.
    torch._dynamo.reset()
    with pytest.raises(torch._dynamo.exc.Unsupported, match="got 8 predictions but 6 targets"):
        torch.compile(f, fullgraph=True)(x, y)


def test_bad_label_under_compile_is_masked_and_reported() -> None:
    torch._dynamo.reset()
    loss_fn = safeloss.SafeCrossEntropyLoss()
    x, y = torch.randn(4, 5), torch.tensor([0, 5, 1, 2])
    with pytest.raises(safeloss.TargetOutOfRangeError, match=r"outside the class range 0\.\.4"):
        loss_fn(x, y)
    # Compiled: the graph masks the label (no out-of-bounds read) and the effectful check op
    # that runs after it raises the same error from the same call.
    with pytest.raises(safeloss.TargetOutOfRangeError, match=r"outside the class range 0\.\.4"):
        torch.compile(loss_fn, fullgraph=True, backend="aot_eager")(x, y)


def test_patched_code_compiles_fullgraph() -> None:
    torch._dynamo.reset()
    module = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    safe = safeloss.SafeCrossEntropyLoss(reduction="none")  # unaffected by the patch, also compiled

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(x * 2, y, reduction="sum") + module(x, y) + safe(x, y).sum()

    x, y = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    want = step(x, y)
    with patch():
        got = torch.compile(step, fullgraph=True, backend="aot_eager")(x, y)
        # Value checks run inside the graph too: on CPU the bad label is reported by the same call.
        with pytest.raises(safeloss.TargetOutOfRangeError, match=r"9 at \[2\]"):
            torch.compile(step, fullgraph=True, backend="aot_eager")(x, torch.tensor([0, 1, 9, 3]))
    torch.testing.assert_close(got, want)


def test_patch_reaches_compiled_code_in_a_fresh_process() -> None:
    """Dynamo resolves its list of torch functions by name when it is imported; patch() must make
    sure that happens before it swaps F.cross_entropy, or compiled code would run stock torch
    silently. Only a fresh process (Dynamo not imported yet) shows it."""
    code = textwrap.dedent("""
        import sys
        import torch
        import torch.nn.functional as F
        import safeloss
        from safeloss.patch import patch
        assert "torch._dynamo" not in sys.modules, "this test needs a process without Dynamo"
        patch()

        def step(x, y):
            return F.cross_entropy(x * 2, y)

        x = torch.randn(4, 5)
        try:
            torch.compile(step, backend="aot_eager")(x, torch.tensor([0, 1, 9, 3]))
        except safeloss.TargetOutOfRangeError as e:  # stock: "Target 9 is out of bounds."
            print("BAD-LABEL", str(e).splitlines()[1].strip())
        try:
            torch.compile(lambda x, y: F.cross_entropy(x, y), backend="aot_eager")(x, torch.tensor([0, 1, 3]))
        except safeloss.BatchSizeMismatchError as e:  # stock: "Expected input batch_size ..."
            print("REACHED", str(e).splitlines()[0])
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "REACHED cross_entropy got 4 predictions but 3 targets." in run.stdout, run.stderr[-3000:]
    assert "BAD-LABEL bad values: 9 at [2]" in run.stdout, run.stderr[-3000:]


# =============================================================================== autocast



@pytest.mark.parametrize(
    ("kwargs", "prob"),
    [
        pytest.param({}, False, id="index-mean"),
        pytest.param({"reduction": "sum"}, False, id="index-sum"),
        pytest.param({"reduction": "none"}, False, id="index-none"),
        pytest.param({"label_smoothing": 0.1}, False, id="index-smoothing"),
        pytest.param({"weight": True}, False, id="index-weight"),
        pytest.param({}, True, id="prob-mean"),
        pytest.param({"reduction": "none", "label_smoothing": 0.1}, True, id="prob-none-smoothing"),
        pytest.param({"weight": True}, True, id="prob-weight"),
    ],
)
@pytest.mark.parametrize("api", ["functional", "module"])
def test_autocast_bf16_follows_stock(api: str, kwargs: dict[str, Any], prob: bool) -> None:
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 5)
    x = torch.randn(6, 8)
    target = torch.softmax(torch.randn(6, 5), 1) if prob else torch.tensor([0, 1, -100, 3, 4, 1])
    if kwargs.get("weight"):
        kwargs = {**kwargs, "weight": torch.tensor([0.3, 1.7, 0.9, 1.1, 2.3])}

    def run(stock: bool) -> tuple[torch.Tensor, torch.Tensor]:
        lin.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = lin(x)
            assert logits.dtype == torch.bfloat16
            if api == "functional":
                out = (F.cross_entropy if stock else safeloss.cross_entropy)(logits, target, **kwargs)
            else:
                cls = torch.nn.CrossEntropyLoss if stock else safeloss.SafeCrossEntropyLoss
                out = cls(**kwargs)(logits, target)
        out.sum().backward()
        assert lin.weight.grad is not None
        return out.detach(), lin.weight.grad.clone()

    (want, want_grad), (got, got_grad) = run(stock=True), run(stock=False)
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grad, want_grad)


def test_plain_bf16_logits_without_autocast_follow_stock() -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, 5).bfloat16()
    y = torch.tensor([0, 1, 2, 3, 4, 1])
    want, got = F.cross_entropy(logits, y), safeloss.cross_entropy(logits, y)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want)


# =============================================================================== DDP


def _ddp_worker(rank: int, world: int, init_method: str, out: str) -> None:
    """One rank: the same 2-layer model trained with stock and with safeloss, DDP over gloo.

    Teardown is explicit and ordered, because gloo aborts a process ("terminate called without an
    active exception") when its threads or a DDP reducer outlive the process group, or when the
    interpreter's exit destroys them in arbitrary order: every rank finishes its collectives
    (barrier), the DDP models die, the group is destroyed, and the process leaves with
    ``os._exit(0)`` once its results are on disk, skipping the C++ static destructors."""
    import gc

    import torch.distributed as dist

    # A file store, not a TCP port: no free-port race with other processes on the machine.
    dist.init_process_group(
        "gloo", init_method=init_method, rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(world * 13, 8, generator=g)  # 13 per rank: an odd, "partial" batch size
        y = torch.randint(0, 5, (world * 13,), generator=g)
        y[rank] = -100
        results = {}
        for name, loss_fn in [
            ("stock", torch.nn.CrossEntropyLoss(label_smoothing=0.05)),
            ("safe", safeloss.SafeCrossEntropyLoss(label_smoothing=0.05, strict=True)),
        ]:
            model = torch.nn.parallel.DistributedDataParallel(_mlp())
            opt = torch.optim.SGD(model.parameters(), lr=0.5)
            losses = []
            for _ in range(4):
                loss = loss_fn(model(x[rank::world]), y[rank::world])
                loss.backward()  # DDP all-reduces (averages) the gradients here
                opt.step()
                opt.zero_grad()
                losses.append(loss.detach())
            results[name] = (torch.stack(losses), [p.detach().clone() for p in model.parameters()])
            del model, opt, loss  # the reducer holds the process group: gone before teardown
        gc.collect()
        dist.barrier()  # no rank tears down while another still talks to it
        torch.save(results, f"{out}.{rank}.tmp")
        os.replace(f"{out}.{rank}.tmp", f"{out}.{rank}")  # complete or absent, never partial
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def test_ddp_two_processes_gloo_matches_stock(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only; inherited by the workers
    world, out = 2, str(tmp_path / "ddp")
    init_method = (tmp_path / "store").as_uri()
    ctx = mp.start_processes(_ddp_worker, args=(world, init_method, out), nprocs=world,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + 180  # a loaded 2-core CI machine: spawn + import take a while
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail("DDP workers did not finish in 180 s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join(5)
    ranks = [torch.load(f"{out}.{r}") for r in range(world)]
    for res in ranks:
        torch.testing.assert_close(res["safe"][0], res["stock"][0], rtol=1e-6, atol=0)
        for got, want in zip(res["safe"][1], res["stock"][1]):
            torch.testing.assert_close(got, want)
    # DDP kept the replicas identical, and training moved the weights.
    for got, want in zip(ranks[1]["safe"][1], ranks[0]["safe"][1]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.equal(ranks[0]["safe"][1][0], _mlp()[0].weight)
