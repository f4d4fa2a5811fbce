"""metassl_fast: fused contrastive losses and batched meta-learning kernels for PyTorch."""
from . import _ext, meta, ops  # noqa: F401  (ops registers the custom ops)
from ._backend import available_backends
from .functional import clip_loss, info_nce, nt_xent, siglip_loss, supcon_loss
from .modules import ClipLoss, InfoNCE, NTXentLoss, SigLipLoss, SupConLoss

__version__ = "0.1.0"

# Load the compiled CPU module now, not lazily inside the first call: a first call made
# under torch.compile would otherwise import it while dynamo traces (which it refuses).
_ext.available("_C")

__all__ = ["ClipLoss", "InfoNCE", "NTXentLoss", "SigLipLoss", "SupConLoss", "available_backends", "clip_loss",
           "info_nce", "nt_xent", "siglip_loss", "supcon_loss", "__version__"]
