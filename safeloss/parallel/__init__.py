"""Cross-entropy for logits sharded over the classes (tensor parallelism).

* :func:`vocab_parallel_cross_entropy` (``vocab.py``): plain local shards, Megatron style;
  ``extras.py`` adds the LLM and RL extras (z-loss, softcap, temperature, statistics).
* ``dtensor.py``: DTensor logits sharded on the class dim under
  ``torch.distributed.tensor.parallel.loss_parallel()``, reached through ``safeloss.cross_entropy``,
  ``SafeCrossEntropyLoss`` and the patched stock loss.
"""

from .extras import vocab_parallel_cross_entropy  # vocab's, plus the LLM and RL extras

__all__ = ["vocab_parallel_cross_entropy"]
