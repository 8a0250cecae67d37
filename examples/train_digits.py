"""Train a small CNN on scikit-learn's bundled digits (8x8 images, 10 classes) with safeloss.

    python examples/train_digits.py                      # trains to ~97% test accuracy in seconds
    python examples/train_digits.py --bug softmax        # inject a classic mistake...
    python examples/train_digits.py --bug softmax --loss stock   # ...and see what stock torch does

Bugs (each is caught by safeloss in the first training step):
    softmax           the model ends in nn.Softmax, but CrossEntropyLoss wants raw logits
    one-based-labels  labels 1..10 instead of 0..9
    bad-view          x.view(-1, 32) folds the spatial positions into the batch
    onehot            F.one_hot(y) labels: integer one-hot vectors instead of class indices

Needs scikit-learn (pip install scikit-learn); the data set ships with it, nothing is downloaded.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import safeloss

BUGS = ("softmax", "one-based-labels", "bad-view", "onehot")


class DigitsCNN(nn.Module):
    def __init__(self, bug: str | None = None) -> None:
        super().__init__()
        self.bug = bug
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # (N, 16, 4, 4)
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (N, 32, 2, 2)
        )
        # The bad-view model was written for features of 32 values per sample.
        self.head = nn.Linear(32 if bug == "bad-view" else 32 * 2 * 2, 10)
        self.softmax = nn.Softmax(dim=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.features(x)
        if self.bug == "bad-view":
            h = h.view(-1, 32)  # BUG: (N, 32, 2, 2) -> (4N, 32): the 2x2 positions become "samples"
        else:
            h = h.flatten(1)  # right: one row per sample, whatever the batch size
        logits = self.head(h)
        if self.bug == "softmax":
            return self.softmax(logits)  # BUG: CrossEntropyLoss applies log-softmax itself
        return logits


def load_data(seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8)
    y = torch.tensor(digits.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = len(y) // 5
    test, train = perm[:n_test], perm[n_test:]
    return x[train], y[train], x[test], y[test]


def make_targets(y: Tensor, bug: str | None) -> Tensor:
    if bug == "one-based-labels":
        return y + 1  # BUG: labels exported from a tool that counts classes from 1
    if bug == "onehot":
        return F.one_hot(y, 10)  # BUG: int64 one-hot rows; class indices were meant
    return y


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bug", choices=BUGS, help="inject a classic cross-entropy mistake")
    parser.add_argument("--loss", choices=["safeloss", "stock"], default="safeloss",
                        help="safeloss.SafeCrossEntropyLoss(strict=True) or torch.nn.CrossEntropyLoss")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    x_train, y_train, x_test, y_test = load_data(args.seed)
    model = DigitsCNN(args.bug)
    # strict=True in training: every likely mistake stops the run at once, instead of a warning
    # scrolling past while a broken model trains.
    loss_fn: nn.Module = (
        safeloss.SafeCrossEntropyLoss(strict=True) if args.loss == "safeloss" else nn.CrossEntropyLoss()
    )
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    print(f"digits: {len(y_train)} train / {len(y_test)} test images, loss: {loss_fn!r}, "
          f"bug: {args.bug or 'none'}")

    start = time.perf_counter()
    step = 0
    for epoch in range(1, args.epochs + 1):
        order = torch.randperm(len(y_train))
        total, count = 0.0, 0
        for i in range(0, len(order), args.batch_size):  # the last batch is smaller: that is fine
            idx = order[i:i + args.batch_size]
            step += 1
            try:
                loss = loss_fn(model(x_train[idx]), make_targets(y_train[idx], args.bug))
            except safeloss.SafeLossError as e:
                print(f"\nsafeloss stopped training at step {step} with {type(e).__name__}:\n{e}")
                return 1
            except (RuntimeError, ValueError, IndexError) as e:  # stock torch's errors, for --loss stock
                print(f"\nstock torch stopped training at step {step} with {type(e).__name__}:\n{e}")
                return 1
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            count += len(idx)
        model.eval()
        with torch.no_grad():
            acc = (model(x_test).argmax(1) == y_test).float().mean().item()
        model.train()
        print(f"epoch {epoch}: train loss {total / count:.4f}, test accuracy {acc:.1%}")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
