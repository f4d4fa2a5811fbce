"""Batched few-shot meta-learning heads: many tasks adapted in one fused call.
anil.py: adapt_linear_head, anil_loss (ANIL / Meta-SGD); proto.py: proto_loss;
modules.py: ANILHead.  The op behind them: ops/inner_loop."""
from .anil import adapt_linear_head, anil_loss
from .modules import ANILHead
from .proto import proto_loss

__all__ = ["ANILHead", "adapt_linear_head", "anil_loss", "proto_loss"]
