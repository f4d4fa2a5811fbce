"""torch.library custom ops ("metassl_fast::<op>_fwd/_bwd"), one module per op."""
from . import contrastive, inner_loop  # noqa: F401  (registers the ops)
