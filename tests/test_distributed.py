"""gather_distributed on 2 gloo processes (CPU): the mean of the per-rank losses equals
the single-process loss on the concatenated batch, each rank's feature gradient is
W times the single-process gradient of its rows, and the mean of the per-rank
gradients of a shared scalar (temperature, logit scale/bias) is its single-process
gradient (DDP's averaging).  See metassl_fast.distributed."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import metassl_fast as msf
from metassl_fast import _ext

WORLD = 2
N, D, M = 5, 8, 3  # rows per rank, features, queue

pytestmark = [
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available"),
    pytest.mark.skipif(not _ext.available("_C"), reason="_C not built"),
]


def _global_data():
    g = torch.Generator().manual_seed(123)
    a = torch.randn(WORLD * N, D, generator=g, dtype=torch.float64)
    b = torch.randn(WORLD * N, D, generator=g, dtype=torch.float64)
    neg = torch.randn(M, D, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 3, (WORLD * N,), generator=g)
    return a, b, neg, labels


# name -> f(a, b, neg, labels, scalars, **dist_kwargs) -> loss;  scalars: (t, bias)
CASES = {
    "nt_xent": lambda a, b, neg, y, s, **kw: msf.nt_xent(a, b, temperature=s[0], **kw),
    "supcon": lambda a, b, neg, y, s, **kw: msf.supcon_loss(torch.stack([a, b], 1), y, temperature=s[0], **kw),
    "info_nce": lambda a, b, neg, y, s, **kw: msf.info_nce(a, b, temperature=s[0], negatives=neg, **kw),
    "info_nce_symmetric": lambda a, b, neg, y, s, **kw: msf.info_nce(a, b, temperature=s[0], symmetric=True,
                                                                     **kw),
    # paired negatives built row by row from the local rows, so they shard with them
    "info_nce_paired": lambda a, b, neg, y, s, **kw: msf.info_nce(
        a, b, temperature=s[0], negatives=torch.stack([b.flip(1), -a], 1), symmetric=True, **kw),
    "clip": lambda a, b, neg, y, s, **kw: msf.clip_loss(a, b, 1 / s[0], **kw),
    "siglip": lambda a, b, neg, y, s, **kw: msf.siglip_loss(a, b, 1 / s[0], s[1], **kw),
    "nt_xent_torch_backend": lambda a, b, neg, y, s, **kw: msf.nt_xent(a, b, temperature=s[0], backend="torch",
                                                                       **kw),
}


def _scalars():
    return (torch.tensor(0.3, dtype=torch.float64, requires_grad=True),
            torch.tensor(-1.5, dtype=torch.float64, requires_grad=True))


def _worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        a, b, neg, y = _global_data()
        rows = slice(rank * N, (rank + 1) * N)
        results = {}
        for name, fn in CASES.items():
            la, lb = a[rows].clone().requires_grad_(), b[rows].clone().requires_grad_()
            s = _scalars()
            loss = fn(la, lb, neg, y[rows], s, gather_distributed=True)
            inputs = [la, lb, *s]
            grads = torch.autograd.grad(loss, inputs, allow_unused=True)
            results[name] = [loss.detach()] + [None if g is None else g.detach() for g in grads]
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def per_rank(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(str(tmp / "init"), str(tmp)), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("name", list(CASES))
def test_matches_single_process(per_rank, name):
    a, b, neg, y = (x.clone() for x in _global_data())
    a.requires_grad_()
    b.requires_grad_()
    s = _scalars()
    loss = CASES[name](a, b, neg, y, s)
    ga, gb, gt, gbias = torch.autograd.grad(loss, [a, b, *s], allow_unused=True)
    got = [r[name] for r in per_rank]
    torch.testing.assert_close(sum(r[0] for r in got) / WORLD, loss.detach(), rtol=1e-10, atol=1e-12)
    for rank, r in enumerate(got):
        rows = slice(rank * N, (rank + 1) * N)
        torch.testing.assert_close(r[1] / WORLD, ga[rows], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(r[2] / WORLD, gb[rows], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(sum(r[3] for r in got) / WORLD, gt, rtol=1e-9, atol=1e-12)
    if gbias is not None:
        torch.testing.assert_close(sum(r[4] for r in got) / WORLD, gbias, rtol=1e-9, atol=1e-12)


def test_not_initialised_is_single_process():
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    torch.testing.assert_close(msf.nt_xent(a, b, gather_distributed=True), msf.nt_xent(a, b))
    with pytest.raises(ValueError, match="process_group"):
        msf.nt_xent(a, b, process_group=object())
    with pytest.raises(TypeError, match="gather_distributed"):
        msf.nt_xent(a, b, gather_distributed=1)


# ---------------------------------------------------------------------------
# the drop-ins' distributed paths against the original packages, rank by rank
# ---------------------------------------------------------------------------

def _compat_cases():
    import originals
    from metassl_fast.compat import lightly as c_lightly
    from metassl_fast.compat import open_clip as c_open_clip

    NT = originals.lightly_ntxent()
    ClipLoss, SigLipLoss = originals.open_clip_losses()
    cases = {"lightly_gather": (lambda r: c_lightly.NTXentLoss(0.3, gather_distributed=True),
                                lambda r: NT(0.3, gather_distributed=True), False)}
    for local in (False, True):
        for with_grad in (False, True):
            kw = dict(local_loss=local, gather_with_grad=with_grad, world_size=WORLD)
            cases[f"clip_local{local}_grad{with_grad}"] = (
                lambda r, kw=kw: c_open_clip.ClipLoss(rank=r, **kw),
                lambda r, kw=kw: ClipLoss(rank=r, **kw), True)
    cases["siglip"] = (lambda r: c_open_clip.SigLipLoss(rank=r, world_size=WORLD),
                       lambda r: SigLipLoss(rank=r, world_size=WORLD), "bias")
    return cases


def _compat_worker(rank, init_file, out_dir):
    import warnings

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    warnings.simplefilter("ignore")  # open_clip's torch.distributed.nn FutureWarnings
    try:
        a, b, _, _ = _global_data()
        rows = slice(rank * N, (rank + 1) * N)
        results = {}
        for name, (ours, orig, extra) in _compat_cases().items():
            per_impl = []
            for make in (ours, orig):
                la = a[rows].float().clone().requires_grad_()
                lb = b[rows].float().clone().requires_grad_()
                s = torch.tensor(7.0, requires_grad=True)
                bias = torch.tensor(-3.0, requires_grad=True)
                fn = make(rank)
                if extra == "bias":
                    loss, inputs = fn(la, lb, s, bias), [la, lb, s, bias]
                elif extra:
                    loss, inputs = fn(la, lb, s), [la, lb, s]
                else:
                    loss, inputs = fn(la, lb), [la, lb]
                grads = torch.autograd.grad(loss, inputs)
                per_impl.append([loss.detach()] + [g.detach() for g in grads])
            results[name] = per_impl
        torch.save(results, os.path.join(out_dir, f"compat{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def compat_per_rank(tmp_path_factory):
    import originals

    originals.lightly_ntxent()  # skips here, before spawning, when a package is missing
    originals.open_clip_losses()
    tmp = tmp_path_factory.mktemp("dist_compat")
    mp.spawn(_compat_worker, args=(str(tmp / "init"), str(tmp)), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"compat{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("name", ["lightly_gather", "clip_localFalse_gradFalse", "clip_localFalse_gradTrue",
                                  "clip_localTrue_gradFalse", "clip_localTrue_gradTrue", "siglip"])
def test_compat_matches_original_per_rank(compat_per_rank, name):
    for rank, res in enumerate(compat_per_rank):
        ours, orig = res[name]
        for i, (x, y) in enumerate(zip(ours, orig)):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=f"rank {rank} output {i}")
