"""Where the evaluation-time epilogues used to live: now :mod:`tinynet.nn.fast.epilogues`.

Re-exported under their older names for older imports (``can_fuse`` is
:func:`~tinynet.nn.fast.epilogues.can_run_in_place`, ``pool_before_relu`` is
:func:`~tinynet.nn.fast.epilogues.reorder_relu_maxpool`).
"""
from .fast.epilogues import (batch_norm_scale_shift, can_run_in_place, conv_bn_eval,  # noqa: F401
                             conv_bn_eval_plain, reorder_relu_maxpool)

can_fuse = can_run_in_place
pool_before_relu = reorder_relu_maxpool

__all__ = ["can_fuse", "batch_norm_scale_shift", "conv_bn_eval", "conv_bn_eval_plain", "pool_before_relu"]
