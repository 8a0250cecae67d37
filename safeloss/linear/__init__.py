"""Linear + cross-entropy (the loss of every LLM head), never materializing the logits.

``api`` holds the public functional and module, ``validation`` the checks of the layer's own
arguments (the target and class weight go through the shared ``safeloss.validation``),
``chunked`` the chunk loop and its autograd, ``graph`` the same loop as custom ops for the settings
that trace a graph (torch.compile, make_fx, export: the batch size stays symbolic), ``patch`` what
``safeloss.patch()`` installs for it.
"""

from .api import SafeLinearCrossEntropyLoss, linear_cross_entropy

__all__ = ["SafeLinearCrossEntropyLoss", "linear_cross_entropy"]
