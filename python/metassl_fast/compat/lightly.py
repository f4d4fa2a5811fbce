"""Drop-in for lightly's NTXentLoss (``from lightly.loss import NTXentLoss``).

Semantics of lightly 1.6.0: both views are L2-normalised.  Without a memory bank it
is SimCLR's NT-Xent over the 2N views (each view's positive is the other view of its
sample, its own column left out), mean over the 2N rows; gather_distributed=True
scores this rank's views against every rank's (metassl_fast.distributed).  With a
memory bank ``memory_bank_size=(size, dim)`` it is MoCo's form: row i's logits are
[out0_i . out1_i, out0_i . bank] / temperature, the bank read before this batch is
enqueued; the bank (random unit rows at construction, from the global RNG, as lightly
draws them) is updated with the normalised out1 only when out0 requires grad, and a
batch that reaches the end of the bank fills it up and drops its remainder (the
pointer returns to 0), exactly as lightly does.
"""
from __future__ import annotations

import warnings
from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import distributed as _dist
from .. import _validate
from .. import functional as _f

__all__ = ["NTXentLoss"]


def _original_class() -> type:
    """lightly's NTXentLoss from its defining module, never through ``lightly.loss``, where a
    user may have assigned this drop-in in its place."""
    from ..benchmarks.originals import lightly_ntxent  # loads the file even where torchvision does not import

    original = lightly_ntxent()

    if original.__module__.startswith("metassl_fast"):
        raise TypeError("lightly.loss.ntx_ent_loss.NTXentLoss is metassl_fast's drop-in itself: the original "
                        "class is needed for a temperature <= 0")
    return original


class NTXentLoss(nn.Module):
    """lightly.loss.NTXentLoss(temperature=0.5, memory_bank_size=0, gather_distributed=False);
    forward(out0 (N, D), out1 (N, D)) -> scalar.  Constructor checks as lightly's:
    |temperature| < 1e-8 and gather_distributed=True without torch.distributed are
    ValueErrors.  A temperature lightly accepts that has no fused path (negative, inf: the
    ops take a finite scale > 0) is computed by lightly's own class (a warning says so);
    without lightly installed it is a TypeError."""

    def __init__(self, temperature: float = 0.5, memory_bank_size: Union[int, Sequence[int]] = 0,
                 gather_distributed: bool = False, backend: str | None = None):
        super().__init__()
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float, torch.Tensor)):
            raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
        if abs(temperature) < 1e-8:  # lightly's own check and message (abs: no float() of a huge int)
            raise ValueError(f"Illegal temperature: abs({temperature}) < 1e-8")
        if gather_distributed and not torch.distributed.is_available():
            raise ValueError("gather_distributed is True but torch.distributed is not available. Please set "
                             "gather_distributed=False or install a torch version with distributed support.")
        self._original = None
        if not _validate.takes_temperature(temperature):
            try:
                original = _original_class()
            except ImportError as exc:
                raise TypeError(f"metassl_fast.compat.lightly.NTXentLoss: temperature={temperature} has no "
                                "fused path, and lightly (which computes it) is not installed") from exc
            warnings.warn(f"metassl_fast.compat.lightly.NTXentLoss: temperature={temperature} has no fused "
                          "path; running lightly's own NTXentLoss (same numbers, its memory and speed)",
                          stacklevel=2)
            self._original = original(temperature, memory_bank_size, gather_distributed)
        self.temperature = temperature
        self.gather_distributed = _validate.flag("gather_distributed", gather_distributed)
        self.backend = backend
        if self._original is not None:  # lightly's class holds the bank (and drew it from the RNG, once)
            return
        size = (memory_bank_size,) if isinstance(memory_bank_size, int) else tuple(memory_bank_size)
        if any((not isinstance(x, int)) or x < 0 for x in size):
            raise ValueError(f"memory_bank_size {memory_bank_size}: all entries must be non-negative integers")
        if isinstance(memory_bank_size, int) and memory_bank_size > 0:
            raise ValueError(f"memory_bank_size={memory_bank_size} does not specify the feature dimension: set it "
                             f"with memory_bank_size=({memory_bank_size}, dim), or pass 0 to disable the bank")
        if size != (0,) and len(size) != 2:
            raise ValueError(f"memory_bank_size {memory_bank_size}: expected a (num_features, dim) tuple, or 0")
        self.size = size
        self.register_buffer("bank", torch.empty(size, dtype=torch.float), persistent=False)
        self.register_buffer("bank_ptr", torch.zeros(1, dtype=torch.long), persistent=False)
        if len(size) == 2:
            with torch.no_grad():  # the same draws as lightly's MemoryBankModule
                self.bank = F.normalize(torch.randn(size).type_as(self.bank), dim=-1)
                self.bank_ptr = torch.zeros(1).type_as(self.bank_ptr)

    @property
    def uses_bank(self) -> bool:
        return self.size[0] > 0

    def forward(self, out0: Tensor, out1: Tensor) -> Tensor:
        if self._original is not None:
            return self._original(out0, out1)
        if not self.uses_bank:
            return _f.nt_xent(out0, out1, temperature=self.temperature, backend=self.backend,
                              gather_distributed=self.gather_distributed)
        _validate.features("out0", out0)
        _validate.features("out1", out1)
        if out0.shape[1] != self.size[1]:
            raise ValueError(f"the memory bank holds vectors of width {self.size[1]} "
                             f"(memory_bank_size={self.size}), but out0 has width {out0.shape[1]}")
        # The bank's rows are unit vectors already, so only out0 and out1 are normalised
        # (here, with autograd) and the bank goes to the op as it is: no copy of it.  The
        # op never keeps it past this call (a scalar loss's gradient is formed in the
        # forward; a recomputing backward would save a copy), so the in-place enqueue
        # below cannot change what the loss saw.
        q, p = F.normalize(out0, dim=1), F.normalize(out1, dim=1)
        negatives = self.bank.detach().to(device=out0.device, dtype=out0.dtype)
        loss = _f.info_nce_explicit(q, p, negatives, temperature=self.temperature, normalize=False,
                                    backend=self.backend)
        if out0.requires_grad:
            self._enqueue(F.normalize(out1.detach(), dim=1))
        return loss

    @torch.no_grad()
    def _enqueue(self, batch: Tensor) -> None:
        if self.gather_distributed and _dist.world()[1] > 1:
            batch = _dist.gather(batch, "out1", with_grad=False)
        size = self.size[0]
        ptr = int(self.bank_ptr)
        n = batch.shape[0]
        if ptr + n >= size:
            self.bank[ptr:] = batch[: size - ptr].to(self.bank.dtype)
            self.bank_ptr.zero_()
        else:
            self.bank[ptr:ptr + n] = batch.to(self.bank.dtype)
            self.bank_ptr[0] = ptr + n
