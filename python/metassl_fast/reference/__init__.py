"""Pure-torch references: obviously correct, materialise every matrix, use autograd.
They are the ground truth of the tests and backend="torch"."""
from .contrastive import contrastive_loss
from .inner_loop import adapt_reference
from .labeled import labeled_contrastive_loss
from .siglip import siglip_loss

__all__ = ["adapt_reference", "contrastive_loss", "labeled_contrastive_loss", "siglip_loss"]
