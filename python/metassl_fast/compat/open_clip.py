"""Drop-ins for open_clip's ClipLoss and SigLipLoss (``from open_clip.loss import ...``).

Semantics of open_clip_torch 3.3.0: the features are used as given (open_clip
normalises them in the model) and logit_scale arrives already exponentiated.
- ClipLoss: (CE(s I T^T) + CE(s T I^T)) / 2 with labels arange(N); a scalar logit_bias
  does not change it.  world_size > 1 (torch.distributed initialised): local_loss=True
  scores this rank's rows against every rank's gathered features (labels offset by
  rank * N); local_loss=False computes the loss of the whole gathered batch on every
  rank.  gather_with_grad=False gathers without gradient (with local_loss=False this
  rank's own block keeps its gradient, as in open_clip).
- SigLipLoss: -(1/N) sum_ij log sigmoid(z_ij (s I_i . T_j + b)), z = +1 on the diagonal;
  with world_size > 1 this rank's images against every rank's texts, divided by the
  local N (what every dist_impl of open_clip computes; the gradients reach the other
  ranks' texts through the gather).
forward(..., output_dict=True) returns {"contrastive_loss": loss}.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import distributed as _dist
from .. import _validate
from .. import functional as _f
from ..ops import labeled

__all__ = ["ClipLoss", "SigLipLoss"]


def _check_world(rank: int, world_size: int) -> None:
    if world_size > 1:
        r, ws = _dist.world()
        if ws != world_size or r != rank:
            raise ValueError(f"rank={rank}, world_size={world_size} do not match torch.distributed "
                             f"(rank {r} of {ws}); initialise the default process group first")


class ClipLoss(nn.Module):
    """open_clip.loss.ClipLoss(local_loss=False, gather_with_grad=False, cache_labels=False,
    rank=0, world_size=1, use_horovod=False); forward(image_features, text_features,
    logit_scale, logit_bias=None, output_dict=False)."""

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False, cache_labels: bool = False,
                 rank: int = 0, world_size: int = 1, use_horovod: bool = False, backend: str | None = None):
        super().__init__()
        if use_horovod:
            raise ValueError("use_horovod=True is not supported: use torch.distributed (NCCL on GPUs)")
        self.local_loss, self.gather_with_grad = local_loss, gather_with_grad
        self.cache_labels = cache_labels  # labels are never materialised here: nothing to cache
        self.rank, self.world_size = rank, world_size
        self.backend = backend

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale, logit_bias=None,
                output_dict: bool = False):
        # a scalar bias shifts every logit of a row alike: the cross-entropies do not change
        if logit_bias is not None and not (isinstance(logit_bias, (int, float)) or
                                           (isinstance(logit_bias, Tensor) and logit_bias.numel() == 1)):
            raise ValueError("logit_bias: only a scalar bias is supported (it leaves CLIP's loss unchanged); "
                             f"got shape {tuple(logit_bias.shape) if isinstance(logit_bias, Tensor) else '?'}")
        loss = self._loss(image_features, text_features, logit_scale)
        if isinstance(logit_bias, Tensor) and logit_bias.requires_grad:
            # its true gradient is 0; keep it in the graph so that it gets one (DDP
            # refuses parameters that take no part in the loss)
            loss = loss + 0 * logit_bias.sum()
        return {"contrastive_loss": loss} if output_dict else loss

    def _loss(self, img, txt, scale):
        if self.world_size <= 1:
            return _f.clip_loss(img, txt, scale, backend=self.backend)
        _check_world(self.rank, self.world_size)
        if self.local_loss:
            if self.gather_with_grad:
                return _f.clip_loss(img, txt, scale, backend=self.backend, gather_distributed=True)
            return _local_loss_no_grad_gather(img, txt, scale, self.backend)
        all_img = _dist.gather(img, "image_features", with_grad=self.gather_with_grad)
        all_txt = _dist.gather(txt, "text_features", with_grad=self.gather_with_grad)
        if not self.gather_with_grad:  # this rank's block keeps its gradient
            n = img.shape[0]
            rows = slice(self.rank * n, (self.rank + 1) * n)
            all_img = torch.cat([all_img[:rows.start], img, all_img[rows.stop:]])
            all_txt = torch.cat([all_txt[:rows.start], txt, all_txt[rows.stop:]])
        return _f.clip_loss(all_img, all_txt, scale, backend=self.backend)


def _local_loss_no_grad_gather(img, txt, scale, backend):
    """Local rows against every rank's columns, the gathered columns without gradient."""
    _validate.features("image_features", img)
    _validate.features("text_features", txt)
    s = _validate.positive_scalar("logit_scale", scale, img.device)
    which = _validate.backend(backend, img.device)  # the labelled-row op rounds float64 on a GPU backend
    rank, ws = _dist.world()
    n, dev = img.shape[0], img.device
    ids = rank * n + torch.arange(n, device=dev)
    all_ids = torch.arange(ws * n, device=dev)
    all_txt = _dist.gather(txt, "text_features", with_grad=False)
    all_img = _dist.gather(img, "image_features", with_grad=False)
    row = labeled.loss(img, all_txt, ids, all_ids, s, False, "mean", False, which)
    col = labeled.loss(txt, all_img, ids, all_ids, s, False, "mean", False, which)
    return 0.5 * (row + col)


class SigLipLoss(nn.Module):
    """open_clip.loss.SigLipLoss(cache_labels=False, rank=0, world_size=1, dist_impl=None);
    forward(image_features, text_features, logit_scale, logit_bias, output_dict=False)."""

    def __init__(self, cache_labels: bool = False, rank: int = 0, world_size: int = 1, dist_impl: str | None = None,
                 backend: str | None = None):
        super().__init__()
        dist_impl = dist_impl or "bidir"
        if dist_impl not in ("bidir", "shift", "reduce", "gather"):
            raise ValueError(f"dist_impl must be one of 'bidir', 'shift', 'reduce', 'gather', got {dist_impl!r}")
        self.cache_labels, self.rank, self.world_size, self.dist_impl = cache_labels, rank, world_size, dist_impl
        self.backend = backend

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale, logit_bias, output_dict: bool = False):
        bias = 0.0 if logit_bias is None else logit_bias
        if self.world_size > 1:
            _check_world(self.rank, self.world_size)
        loss = _f.siglip_loss(image_features, text_features, logit_scale, bias, backend=self.backend,
                              gather_distributed=self.world_size > 1)
        return {"contrastive_loss": loss} if output_dict else loss
