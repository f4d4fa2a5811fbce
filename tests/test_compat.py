"""metassl_fast.compat against the original packages' own code on the same inputs:
loss and gradients agree to 1e-5 relative in float32 (tests/originals.py loads them)."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import originals
from helpers import leaves as _leaves
from metassl_fast import _ext
from metassl_fast.compat import info_nce as c_info_nce
from metassl_fast.compat import lightly as c_lightly
from metassl_fast.compat import open_clip as c_open_clip
from metassl_fast.compat import pytorch_metric_learning as c_pml

pytestmark = pytest.mark.skipif(not _ext.available("_C"), reason="_C not built")

RTOL = 1e-5


def _same(ours_fn, orig_fn, inputs, what=""):
    """Loss and the gradient of every input (that requires grad) agree."""
    lo = ours_fn(*inputs)
    lr = orig_fn(*inputs)
    torch.testing.assert_close(lo, lr, rtol=RTOL, atol=1e-6, msg=f"{what}: loss")
    if lr.requires_grad:
        diff = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
        go = torch.autograd.grad(lo, diff, allow_unused=True)
        gr = torch.autograd.grad(lr, diff, allow_unused=True)
        for i, (a, b) in enumerate(zip(go, gr)):
            if b is None:
                assert a is None or (a == 0).all(), f"{what}: input {i} has a gradient the original lacks"
                continue
            scale = b.abs().max().clamp_min(1e-6)
            assert ((a - b).abs().max() / scale) < 3 * RTOL, f"{what}: gradient {i} differs"
    return lo


# ---------------------------------------------------------------------------
# pytorch-metric-learning
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("n,classes", [(4, 2), (16, 3), (33, 5), (64, 64)])
@pytest.mark.parametrize("name", ["NTXentLoss", "SupConLoss"])
def test_pml_with_labels(name, n, classes):
    pml = originals.pml()
    g = torch.Generator().manual_seed(n)
    y = torch.randint(0, classes, (n,), generator=g)
    (x,) = _leaves((n, 12), seed=n)
    for t in (0.07, 0.5):
        _same(getattr(c_pml, name)(temperature=t), getattr(pml, name)(temperature=t), [x, y], f"{name} t={t}")


@pytest.mark.parametrize("name", ["NTXentLoss", "SupConLoss"])
@pytest.mark.parametrize("ref_labels_kind", ["other", "same_object", "none"])
def test_pml_with_ref_emb(name, ref_labels_kind):
    pml = originals.pml()
    x, r = _leaves((10, 8), (10, 8), seed=3)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 3])
    yr = {"other": torch.tensor([1, 1, 0, 2, 3, 0, 2, 2, 1, 0]), "same_object": y, "none": None}[ref_labels_kind]
    ours, orig = getattr(c_pml, name)(), getattr(pml, name)()
    _same(lambda a, b: ours(a, y, ref_emb=b, ref_labels=yr), lambda a, b: orig(a, y, ref_emb=b, ref_labels=yr),
          [x, r], f"{name} ref_labels={ref_labels_kind}")


@pytest.mark.parametrize("name", ["NTXentLoss", "SupConLoss"])
@pytest.mark.parametrize("labels", [[0, 1, 2, 3], [5, 5, 5, 5], [0, 0, 1, 2]])
def test_pml_degenerate_batches(name, labels):
    """No positive pair, no negative pair, anchors without positives."""
    pml = originals.pml()
    (x,) = _leaves((4, 6), seed=1)
    y = torch.tensor(labels)
    lo = getattr(c_pml, name)()(x, y)
    lr = getattr(pml, name)()(x, y)
    torch.testing.assert_close(lo, lr, rtol=RTOL, atol=1e-6)
    lo.backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("name", ["NTXentLoss", "SupConLoss"])
def test_pml_self_supervised(symmetric, name):
    pml = originals.pml()
    a, b = _leaves((24, 16), (24, 16), seed=7)
    ours = c_pml.SelfSupervisedLoss(getattr(c_pml, name)(temperature=0.2), symmetric=symmetric)
    orig = pml.SelfSupervisedLoss(getattr(pml, name)(temperature=0.2), symmetric=symmetric)
    _same(ours, orig, [a, b], f"SelfSupervised {name} symmetric={symmetric}")


def test_pml_unfused_arguments_run_the_original_and_warn():
    pml = originals.pml()
    from pytorch_metric_learning.distances import DotProductSimilarity

    (x,) = _leaves((12, 5), seed=2)
    y = torch.randint(0, 3, (12,), generator=torch.Generator().manual_seed(0))
    c_pml._warned.clear()
    with pytest.warns(UserWarning, match="no fused path"):
        ours = c_pml.NTXentLoss(temperature=0.1, distance=DotProductSimilarity())
    orig = pml.NTXentLoss(temperature=0.1, distance=DotProductSimilarity())
    _same(ours, orig, [x, y], "custom distance")
    miner_out = (torch.tensor([0, 1]), torch.tensor([3, 4]), torch.tensor([0, 1]), torch.tensor([2, 5]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = c_pml.SupConLoss()(x, y, indices_tuple=miner_out)
    torch.testing.assert_close(got, pml.SupConLoss()(x, y, indices_tuple=miner_out))


def test_pml_bad_input():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="labels"):
        c_pml.NTXentLoss()(x)
    with pytest.raises(ValueError, match="labels"):
        c_pml.NTXentLoss()(x, torch.tensor([0, 1, 0]))
    with pytest.raises(TypeError, match="labels"):
        c_pml.SupConLoss()(x, torch.tensor([0.0, 1.0, 0.0, 1.0]))
    with pytest.raises(TypeError, match="temperature"):
        c_pml.NTXentLoss(temperature="hot")


# Drop-ins swapped into the original package by assignment, as a user speeds up a trainer
# they do not own: the original's own code then constructs and calls ours (issue 12, item 9).

@pytest.fixture
def pml_swapped(monkeypatch):
    """pytorch_metric_learning.losses.{NTXentLoss, SupConLoss, SelfSupervisedLoss} replaced by
    the drop-ins; -> (the patched package module, the original classes)."""
    pml = originals.pml()
    from pytorch_metric_learning.losses import ntxent_loss, self_supervised_loss, supcon_loss

    orig = {"NTXentLoss": ntxent_loss.NTXentLoss, "SupConLoss": supcon_loss.SupConLoss,
            "SelfSupervisedLoss": self_supervised_loss.SelfSupervisedLoss}
    for name in orig:
        monkeypatch.setattr(pml, name, getattr(c_pml, name))
    return pml, orig


@pytest.mark.parametrize("name", ["NTXentLoss", "SupConLoss"])
def test_pml_swapped_in_by_assignment(pml_swapped, name):
    pml, orig = pml_swapped
    (x,) = _leaves((12, 5), seed=3)
    y = torch.randint(0, 3, (12,), generator=torch.Generator().manual_seed(1))
    assert isinstance(pml.__dict__[name](), c_pml._PMLLoss)
    _same(pml.__dict__[name](temperature=0.2), orig[name](temperature=0.2), [x, y], f"{name} swapped")
    # an argument without a fused path: the original runs (found from its defining module,
    # not through the patched package, which recursed forever)
    from pytorch_metric_learning.distances import DotProductSimilarity
    from pytorch_metric_learning.reducers import SumReducer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = pml.__dict__[name](temperature=0.2, distance=DotProductSimilarity(), reducer=SumReducer())
        miner = (torch.tensor([0, 1]), torch.tensor([3, 4]), torch.tensor([0, 1]), torch.tensor([2, 5]))
        got_mined = pml.__dict__[name](temperature=0.2)(x, y, indices_tuple=miner)
    _same(ours, orig[name](temperature=0.2, distance=DotProductSimilarity(), reducer=SumReducer()), [x, y],
          f"{name} swapped, unfused")
    torch.testing.assert_close(got_mined, orig[name](temperature=0.2)(x, y, indices_tuple=miner))


@pytest.mark.parametrize("symmetric", [True, False])
def test_pml_self_supervised_swapped_wraps_any_loss(pml_swapped, symmetric):
    pml, orig = pml_swapped
    a, b = _leaves((10, 6), (10, 6), seed=4)
    # the original SelfSupervisedLoss around our (swapped-in) NTXentLoss ...
    _same(lambda u, v: orig["SelfSupervisedLoss"](pml.NTXentLoss(), symmetric=symmetric)(u, v),
          lambda u, v: orig["SelfSupervisedLoss"](orig["NTXentLoss"](), symmetric=symmetric)(u, v), [a, b],
          "original wrapper, our loss")
    # ... and ours around one of pml's own losses: handed to the original wrapper
    from pytorch_metric_learning.losses import TripletMarginLoss

    _same(pml.SelfSupervisedLoss(TripletMarginLoss(), symmetric=symmetric),
          orig["SelfSupervisedLoss"](TripletMarginLoss(), symmetric=symmetric), [a, b], "our wrapper, pml's loss")
    with pytest.raises(Exception, match="not supported"):  # the original's own refusal, unchanged
        pml.SelfSupervisedLoss(torch.nn.MSELoss())
    # the original's class-level API, which its own tests call on the swapped-in class
    assert pml.SelfSupervisedLoss.supported_losses() == orig["SelfSupervisedLoss"].supported_losses()
    with pytest.raises(Exception, match="not supported"):
        pml.SelfSupervisedLoss.check_loss_support("MSELoss")


@pytest.mark.parametrize("temperature", [-0.5, 0.0, float("inf")])
def test_pml_temperatures_the_op_refuses_are_computed_by_the_original(pml_swapped, temperature):
    pml, orig = pml_swapped
    (x,) = _leaves((8, 4), seed=5)
    y = torch.tensor([0, 1, 0, 1, 2, 2, 3, 3])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = pml.NTXentLoss(temperature=temperature)
    want = orig["NTXentLoss"](temperature=temperature)(x, y)
    got = ours(x, y)
    torch.testing.assert_close(got, want, equal_nan=True)


def test_lightly_constructor_checks_match_lightly(monkeypatch):
    orig = originals.lightly_ntxent()
    for t in (0.0, 1e-9, -1e-9):
        with pytest.raises(ValueError, match="Illegal temperature"):
            orig(temperature=t)
        with pytest.raises(ValueError, match="Illegal temperature"):
            c_lightly.NTXentLoss(temperature=t)
    monkeypatch.setattr(torch.distributed, "is_available", lambda: False)
    with pytest.raises(ValueError, match="torch.distributed is not available"):
        orig(gather_distributed=True)
    with pytest.raises(ValueError, match="torch.distributed is not available"):
        c_lightly.NTXentLoss(gather_distributed=True)


@pytest.mark.parametrize("temperature", [float("inf"), 10**400])
def test_lightly_other_temperatures_it_accepts_go_to_lightly(temperature):
    orig = originals.lightly_ntxent()
    a, b = _leaves((6, 4), (6, 4), seed=7)
    with pytest.warns(UserWarning, match="no fused path"):
        ours = c_lightly.NTXentLoss(temperature=temperature)
    try:
        want = orig(temperature=temperature)(a, b)
    except Exception as exc:  # noqa: BLE001 - whatever lightly raises, ours raises the same
        with pytest.raises(type(exc)):
            ours(a, b)
        return
    torch.testing.assert_close(ours(a, b), want)


def test_pml_temperature_whose_inverse_overflows_goes_to_the_original(pml_swapped):
    pml, orig = pml_swapped
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert pml.NTXentLoss(temperature=1e-310)._original is not None


@pytest.mark.parametrize("bank", [0, (16, 5)])
def test_lightly_negative_temperature_is_computed_not_refused(monkeypatch, bank):
    orig = originals.lightly_ntxent()
    import sys

    if "lightly.loss" in sys.modules:  # swapped in by assignment, as a user would
        monkeypatch.setattr(sys.modules["lightly.loss"], "NTXentLoss", c_lightly.NTXentLoss, raising=False)
    a, b = _leaves((8, 5), (8, 5), seed=6)
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="no fused path"):
        ours = c_lightly.NTXentLoss(temperature=-0.3, memory_bank_size=bank)
    torch.manual_seed(0)
    theirs = orig(temperature=-0.3, memory_bank_size=bank)
    for step in range(2):
        _same(ours, theirs, [a, b], f"negative temperature, step {step}")


# ---------------------------------------------------------------------------
# info-nce-pytorch
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("mode", ["in_batch", "unpaired", "paired"])
def test_info_nce(reduction, mode):
    m = originals.info_nce_pkg()
    n, d, k = 37, 16, 11
    q, p = _leaves((n, d), (n, d), seed=4)
    neg = {"in_batch": None, "unpaired": _leaves((k, d), seed=5)[0], "paired": _leaves((n, k, d), seed=6)[0]}[mode]
    negative_mode = "paired" if mode == "paired" else "unpaired"
    ours = c_info_nce.InfoNCE(temperature=0.2, reduction=reduction, negative_mode=negative_mode)
    orig = m.InfoNCE(temperature=0.2, reduction=reduction, negative_mode=negative_mode)
    inputs = [q, p] + ([neg] if neg is not None else [])
    _same(lambda *a: ours(*a).sum(), lambda *a: orig(*a).sum(), inputs, f"{mode} {reduction}")
    if reduction == "none":
        torch.testing.assert_close(ours(*inputs), orig(*inputs), rtol=RTOL, atol=1e-6)


def test_info_nce_functional_and_errors():
    m = originals.info_nce_pkg()
    q, p, neg = _leaves((9, 4), (9, 4), (3, 4), seed=8)
    torch.testing.assert_close(c_info_nce.info_nce(q, p, neg, temperature=0.5), m.info_nce(q, p, neg, temperature=0.5))
    with pytest.raises(ValueError, match="query"):
        c_info_nce.info_nce(q[0], p)
    with pytest.raises(ValueError, match="negative_keys"):
        c_info_nce.info_nce(q, p, neg[None], negative_mode="unpaired")
    with pytest.raises(ValueError, match="negative_keys"):
        c_info_nce.info_nce(q, p, neg, negative_mode="paired")
    with pytest.raises(ValueError, match="negative_mode"):
        c_info_nce.info_nce(q, p, neg, negative_mode="both")


# ---------------------------------------------------------------------------
# lightly
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("n,d", [(1, 3), (8, 16), (65, 32)])
@pytest.mark.parametrize("t", [0.1, 0.5])
def test_lightly_ntxent(n, d, t):
    NT = originals.lightly_ntxent()
    a, b = _leaves((n, d), (n, d), seed=n)
    _same(c_lightly.NTXentLoss(temperature=t), NT(temperature=t), [a, b], f"n={n} t={t}")


def test_lightly_memory_bank_over_steps():
    """Same bank draws at construction, same enqueue (including the wrap that drops the
    rest of a batch), same loss and gradients at every step; no update without grad."""
    NT = originals.lightly_ntxent()
    torch.manual_seed(11)
    orig = NT(temperature=0.3, memory_bank_size=(40, 16))
    torch.manual_seed(11)
    ours = c_lightly.NTXentLoss(temperature=0.3, memory_bank_size=(40, 16))
    torch.testing.assert_close(ours.bank, orig.memory_bank.bank)
    for step in range(7):
        a, b = _leaves((12, 16), (12, 16), seed=100 + step)
        if step == 3:
            a = a.detach()  # out0 without grad: the bank is read, not updated
            lo, lr = ours(a, b), orig(a, b)
            torch.testing.assert_close(lo, lr, rtol=RTOL, atol=1e-6)
        else:
            _same(ours, orig, [a, b], f"step {step}")
        torch.testing.assert_close(ours.bank, orig.memory_bank.bank, msg=f"bank after step {step}")
        assert int(ours.bank_ptr) == int(orig.memory_bank.bank_ptr)


def test_lightly_bad_input():
    with pytest.raises(ValueError, match="feature dimension"):
        c_lightly.NTXentLoss(memory_bank_size=32)
    with pytest.raises(ValueError, match="memory_bank_size"):
        c_lightly.NTXentLoss(memory_bank_size=(4, 5, 6))
    with pytest.raises(ValueError, match="temperature"):
        c_lightly.NTXentLoss(temperature=0.0)
    loss = c_lightly.NTXentLoss(memory_bank_size=(8, 5))
    with pytest.raises(ValueError, match="width"):
        loss(torch.randn(4, 3), torch.randn(4, 3))


# ---------------------------------------------------------------------------
# open_clip
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("n,d", [(1, 4), (16, 32), (65, 24)])
def test_open_clip_losses(n, d):
    ClipLoss, SigLipLoss = originals.open_clip_losses()
    a, b = _leaves((n, d), (n, d), seed=n)
    s = torch.tensor(14.0, requires_grad=True)
    bias = torch.tensor(-8.0, requires_grad=True)

    def unit(x):
        return F.normalize(x, dim=-1)

    _same(lambda a, b, s: c_open_clip.ClipLoss()(unit(a), unit(b), s),
          lambda a, b, s: ClipLoss()(unit(a), unit(b), s), [a, b, s], "ClipLoss")
    _same(lambda a, b, s, c: c_open_clip.SigLipLoss()(unit(a), unit(b), s, c),
          lambda a, b, s, c: SigLipLoss()(unit(a), unit(b), s, c), [a, b, s, bias], "SigLipLoss")
    _same(lambda a, b: c_open_clip.SigLipLoss()(a, b, 3.0, None), lambda a, b: SigLipLoss()(a, b, 3.0, None),
          [a, b], "SigLipLoss without bias")
    out = c_open_clip.ClipLoss()(a, b, s, output_dict=True)
    ref = ClipLoss()(a, b, s, output_dict=True)
    assert out.keys() == ref.keys()
    out = c_open_clip.SigLipLoss()(a, b, s, bias, output_dict=True)
    assert out.keys() == SigLipLoss()(a, b, s, bias, output_dict=True).keys()


def test_open_clip_bad_input():
    with pytest.raises(ValueError, match="horovod"):
        c_open_clip.ClipLoss(use_horovod=True)
    with pytest.raises(ValueError, match="dist_impl"):
        c_open_clip.SigLipLoss(dist_impl="ring")
    with pytest.raises(ValueError, match="world_size"):
        c_open_clip.ClipLoss(world_size=2, rank=1)(torch.randn(3, 2), torch.randn(3, 2), 2.0)


def test_pml_supcon_drops_anchors_whose_loss_rounds_to_zero():
    """AvgNonZeroReducer averages over anchors with loss > 0 as computed: a well separated
    pair's anchors (loss exactly 0 in float32) leave the mean (found by review)."""
    pml = originals.pml()
    e = torch.tensor([[1., 0, 0], [1., 0, 0], [-1., .3, .2], [-1., .1, .5], [-1., .5, .1], [-1., .2, .4]],
                     requires_grad=True)
    lab = torch.tensor([0, 0, 1, 1, 2, 2])
    for t in (0.1, 0.05, 0.02):
        _same(lambda x: c_pml.SupConLoss(temperature=t)(x, lab), lambda x: pml.SupConLoss(temperature=t)(x, lab),
              [e], f"t={t}")


def test_pml_ntxent_half_precision_warns():
    c_pml._warned.discard("NTXentLoss-half")
    x = torch.randn(8, 4).half()
    with pytest.warns(UserWarning, match="half precision"):
        c_pml.NTXentLoss()(x, torch.tensor([0, 1, 2, 3, 0, 1, 2, 3]))


def test_open_clip_clip_loss_refuses_a_non_scalar_bias():
    a, b = torch.randn(6, 4), torch.randn(6, 4)
    with pytest.raises(ValueError, match="logit_bias"):
        c_open_clip.ClipLoss()(a, b, 10.0, torch.linspace(-3, 3, 6))
    torch.testing.assert_close(c_open_clip.ClipLoss()(a, b, 10.0, torch.tensor(2.0)), c_open_clip.ClipLoss()(a, b, 10.0))


def test_open_clip_scalar_bias_gets_a_zero_gradient():
    """A learnable scalar bias takes part in the graph (gradient 0, its true value), as in
    open_clip, so DDP does not find an unused parameter (found by review)."""
    a, b = torch.randn(6, 4), torch.randn(6, 4)
    bias = torch.tensor(-2.0, requires_grad=True)
    (g,) = torch.autograd.grad(c_open_clip.ClipLoss()(a, b, 10.0, bias), [bias])
    assert g.item() == 0.0
