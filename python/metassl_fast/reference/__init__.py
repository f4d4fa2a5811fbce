"""Pure-torch references: obviously correct, materialise every matrix, use autograd.
They are the ground truth of the tests and backend="torch"."""
from .contrastive import contrastive_loss

__all__ = ["contrastive_loss"]
