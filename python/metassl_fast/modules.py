"""nn.Module wrappers of the functional API."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from . import _validate
from .functional import clip_loss, info_nce, nt_xent, siglip_loss, supcon_loss


class _TemperatureLoss(nn.Module):
    """Shared constructor of the temperature-scaled losses below."""

    def __init__(self, temperature: float, normalize: bool, reduction: str, backend: str | None):
        super().__init__()
        if not isinstance(temperature, Tensor):  # a tensor is checked at each call
            _validate.positive_scalar("temperature", temperature, device=None)
        self.temperature = temperature
        self.normalize = _validate.flag("normalize", normalize)
        self.reduction = _validate.reduction(reduction)
        self.backend = backend

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, normalize={self.normalize}, reduction={self.reduction!r}"


class InfoNCE(_TemperatureLoss):
    """InfoNCE loss module; forward(query (N, D), key (N, D), negatives=None (M, D) or
    (N, M, D)).  See metassl_fast.info_nce for the semantics."""

    def __init__(self, temperature: float = 0.07, symmetric: bool = False, normalize: bool = True,
                 reduction: str = "mean", backend: str | None = None):
        super().__init__(temperature, normalize, reduction, backend)
        self.symmetric = _validate.flag("symmetric", symmetric)

    def forward(self, query: Tensor, key: Tensor, negatives: Tensor | None = None) -> Tensor:
        return info_nce(query, key, temperature=self.temperature, negatives=negatives,
                        symmetric=self.symmetric, normalize=self.normalize,
                        reduction=self.reduction, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, symmetric={self.symmetric}"


class ClipLoss(nn.Module):
    """CLIP loss module; forward(image_features (N, D), text_features (N, D), logit_scale).
    See metassl_fast.clip_loss."""

    def __init__(self, backend: str | None = None):
        super().__init__()
        self.backend = backend

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale) -> Tensor:
        return clip_loss(image_features, text_features, logit_scale, backend=self.backend)


class NTXentLoss(_TemperatureLoss):
    """SimCLR's NT-Xent; forward(z1 (N, D), z2 (N, D)).  See metassl_fast.nt_xent."""

    def __init__(self, temperature: float = 0.5, normalize: bool = True, reduction: str = "mean",
                 backend: str | None = None):
        super().__init__(temperature, normalize, reduction, backend)

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        return nt_xent(z1, z2, temperature=self.temperature, normalize=self.normalize,
                       reduction=self.reduction, backend=self.backend)


class SupConLoss(_TemperatureLoss):
    """Supervised contrastive loss; forward(features (N, D) or (N, V, D), labels (N,)).
    See metassl_fast.supcon_loss."""

    def __init__(self, temperature: float = 0.1, normalize: bool = True, reduction: str = "mean",
                 backend: str | None = None):
        super().__init__(temperature, normalize, reduction, backend)

    def forward(self, features: Tensor, labels: Tensor) -> Tensor:
        return supcon_loss(features, labels, temperature=self.temperature, normalize=self.normalize,
                           reduction=self.reduction, backend=self.backend)


class SigLipLoss(nn.Module):
    """SigLIP's sigmoid loss; forward(image_features, text_features, logit_scale=None,
    logit_bias=None).  Without them it uses its own learnable parameters, initialised as
    in the SigLIP paper: logit_scale = exp(log_scale) with log_scale = log(10), bias -10.
    See metassl_fast.siglip_loss."""

    def __init__(self, init_log_scale: float = math.log(10.0), init_bias: float = -10.0,
                 backend: str | None = None):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(float(init_log_scale)))
        self.logit_bias = nn.Parameter(torch.tensor(float(init_bias)))
        self.backend = backend

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale=None, logit_bias=None) -> Tensor:
        if logit_scale is None:
            logit_scale = self.logit_scale.exp()
        if logit_bias is None:
            logit_bias = self.logit_bias
        return siglip_loss(image_features, text_features, logit_scale, logit_bias, backend=self.backend)
