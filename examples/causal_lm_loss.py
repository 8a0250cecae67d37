"""Next-token loss of a causal language model with safeloss: padding masked by ignore_index, and
the micro-batch in which every target is masked.

    python examples/causal_lm_loss.py            # default mode: safeloss warns about the empty micro-batch
    python examples/causal_lm_loss.py --strict   # strict mode: it raises EmptyBatchError instead

A toy bigram model keeps it self-contained; the loss code is the same for any (N, T, V) logits.
"""

from __future__ import annotations

import argparse
import sys
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import safeloss

VOCAB, PAD, IGNORE = 16, 0, -100


def make_batch(lengths: list[int], prompt: int = 0, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Right-padded token ids (N, T) and next-token labels (N, T).

    Labels are the inputs shifted left by one. Positions with no next token (padding, the last
    token) and the first ``prompt`` positions (supervised fine-tuning trains on answers only) get
    ``ignore_index``, so they add nothing to the loss.
    """
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.full((len(lengths), T), PAD)
    labels = torch.full((len(lengths), T), IGNORE)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(1, VOCAB, (n,), generator=g)
        labels[i, : n - 1] = ids[i, 1:n]
        labels[i, : max(prompt - 1, 0)] = IGNORE
    return ids, labels


class Bigram(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(VOCAB, 32)
        self.head = nn.Linear(32, VOCAB)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(self.emb(ids))  # (N, T, V)


def section(title: str) -> None:
    print(f"\n== {title}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--strict", action="store_true", help="turn safeloss warnings into errors")
    args = parser.parse_args(argv)
    with safeloss.strict_mode(args.strict):
        demo()
    return 0


def demo() -> None:
    loss_fn = safeloss.SafeCrossEntropyLoss(ignore_index=IGNORE)
    model = Bigram()
    ids, labels = make_batch([7, 4, 2])
    logits = model(ids)

    section("1. logits are (N, T, V), but cross_entropy wants the classes in dim 1")
    try:
        loss_fn(logits, labels)
    except safeloss.SafeLossError as e:
        print(f"{type(e).__name__}: {e}")
    print("So: loss_fn(logits.transpose(1, 2), labels)   # (N, V, T), a view, no copy")

    section("2. padding and the last token are masked with ignore_index=-100")
    print("labels:\n" + str(labels))
    loss = loss_fn(logits.transpose(1, 2), labels)
    valid = labels != IGNORE
    by_hand = -logits.log_softmax(-1)[valid].gather(1, labels[valid][:, None]).mean()
    stock = F.cross_entropy(logits.transpose(1, 2), labels)
    print(f"safeloss {loss.item():.5f} = stock {stock.item():.5f} = mean over the "
          f"{int(valid.sum())} real targets {by_hand.item():.5f}")

    section("3. padding labelled -1 (not ignore_index) is caught, not trained on")
    try:
        loss_fn(logits.transpose(1, 2), labels.masked_fill(~valid, -1))
    except safeloss.SafeLossError as e:
        print(f"{type(e).__name__}: {e}")

    section("4. gradient accumulation: a micro-batch whose targets are all masked")
    # Two micro-batches; the second holds one short sample whose tokens are all prompt.
    micro = [make_batch([7, 4], seed=1), make_batch([3], prompt=3, seed=2)]
    print(f"micro-batch 2 labels: {micro[1][1].tolist()}  (nothing to predict)")
    with torch.no_grad():
        stock_mean = F.cross_entropy(model(micro[1][0]).transpose(1, 2), micro[1][1])
    print(f"stock torch, reduction='mean': {stock_mean.item()}   (NaN, silently: the logged "
          "loss, a GradScaler, any sum of losses are now NaN)")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", safeloss.SafeLossWarning)
            out = loss_fn(model(micro[1][0]).transpose(1, 2), micro[1][1])
        print(f"safeloss, default mode: {out.item()} (the value stock torch gives), and it says why:")
        for w in caught:
            print(f"SafeLossWarning: {w.message}")
    except safeloss.EmptyBatchError as e:
        print(f"safeloss, strict mode: EmptyBatchError: {e}")

    section("5. the fix: sum over tokens, divided by the real targets of the whole batch")
    sum_fn = safeloss.SafeCrossEntropyLoss(ignore_index=IGNORE, reduction="sum")
    n_items = sum(int((lab != IGNORE).sum()) for _, lab in micro)  # what HF calls num_items_in_batch
    model.zero_grad()
    logged = 0.0
    for mids, mlabels in micro:
        part = sum_fn(model(mids).transpose(1, 2), mlabels) / max(n_items, 1)
        part.backward()  # the all-masked micro-batch contributes exactly 0, not NaN
        logged += part.item()
    accumulated = [p.grad.clone() for p in model.parameters()]
    # Reference: the same samples as one batch, with the plain mean over its real targets.
    model.zero_grad()
    full_ids, full_labels = make_batch([7, 4], seed=1)
    full_labels = F.pad(full_labels, (0, 0, 0, 1), value=IGNORE)
    full_ids = F.pad(full_ids, (0, 0, 0, 1), value=PAD)
    full_ids[2, :3] = micro[1][0][0]
    full = loss_fn(model(full_ids).transpose(1, 2), full_labels)
    full.backward()
    same = all(torch.allclose(a, p.grad) for a, p in zip(accumulated, model.parameters()))
    print(f"accumulated loss {logged:.6f}, one-batch loss {full.item():.6f}, same gradients: {same}")
    print("(The mean of per-micro-batch means would weigh a 1-token micro-batch like a 100-token "
          "one, and is NaN whenever one of them is empty.)")


if __name__ == "__main__":
    sys.exit(main())
