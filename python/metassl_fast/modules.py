"""nn.Module wrappers of the functional API."""
from __future__ import annotations

from torch import Tensor, nn

from . import _validate
from .functional import clip_loss, info_nce


class InfoNCE(nn.Module):
    """InfoNCE loss module; forward(query (N, D), key (N, D), negatives=None (M, D)).
    See metassl_fast.info_nce for the semantics."""

    def __init__(self, temperature: float = 0.07, symmetric: bool = False, normalize: bool = True,
                 reduction: str = "mean", backend: str | None = None):
        super().__init__()
        if not isinstance(temperature, Tensor):  # a tensor is checked at each call
            _validate.positive_scalar("temperature", temperature, device=None)
        self.temperature = temperature
        self.symmetric = _validate.flag("symmetric", symmetric)
        self.normalize = _validate.flag("normalize", normalize)
        self.reduction = _validate.reduction(reduction)
        self.backend = backend

    def forward(self, query: Tensor, key: Tensor, negatives: Tensor | None = None) -> Tensor:
        return info_nce(query, key, temperature=self.temperature, negatives=negatives,
                        symmetric=self.symmetric, normalize=self.normalize,
                        reduction=self.reduction, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, symmetric={self.symmetric}, "
                f"normalize={self.normalize}, reduction={self.reduction!r}")


class ClipLoss(nn.Module):
    """CLIP loss module; forward(image_features (N, D), text_features (N, D), logit_scale).
    See metassl_fast.clip_loss."""

    def __init__(self, backend: str | None = None):
        super().__init__()
        self.backend = backend

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale) -> Tensor:
        return clip_loss(image_features, text_features, logit_scale, backend=self.backend)
