"""The cross-entropy op: ``safeloss.cross_entropy`` (``functional``) and ``SafeCrossEntropyLoss``
(``module``), thin entries over ``pipeline``, which runs one call through the shared layers.
"""
