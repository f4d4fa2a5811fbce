"""torch.library custom ops ("metassl_fast::<op>_fwd/_bwd"), one module per op."""
from . import contrastive  # noqa: F401  (registers the ops)
