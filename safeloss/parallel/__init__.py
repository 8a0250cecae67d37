"""Cross-entropy for logits sharded over the classes (tensor parallelism).

* :func:`vocab_parallel_cross_entropy` (``vocab.py``): plain local shards, Megatron style, with
  the LLM and RL extras (z-loss, softcap, temperature, statistics) in the same engine.
* ``dtensor.py``: DTensor logits of any layout (the classes sharded under
  ``torch.distributed.tensor.parallel.loss_parallel()``, or the positions sharded), reached through
  ``safeloss.cross_entropy``, ``SafeCrossEntropyLoss`` and the patched stock loss; it builds a
  ``vocab.Sharding`` and runs the same engine.
"""

from .vocab import vocab_parallel_cross_entropy

__all__ = ["vocab_parallel_cross_entropy"]
