"""Drop-in replacements for the contrastive losses of other libraries: same constructor
and forward signatures, same numbers, fused kernels underneath.  Change one import line:

    from metassl_fast.compat.lightly import NTXentLoss                  # lightly.loss
    from metassl_fast.compat.pytorch_metric_learning import NTXentLoss  # pytorch_metric_learning.losses
    from metassl_fast.compat.info_nce import InfoNCE, info_nce          # info_nce (info-nce-pytorch)
    from metassl_fast.compat.open_clip import ClipLoss, SigLipLoss      # open_clip.loss

Checked against lightly 1.6.0, pytorch-metric-learning 2.9.0, info-nce-pytorch 0.1.4 and
open_clip_torch 3.3.0 (tests/test_compat.py runs the originals on the same inputs).
"""
