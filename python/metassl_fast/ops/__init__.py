"""torch.library custom ops "metassl_fast::<op>_fwd/_bwd", one package per op
(ops/<op>/__init__.py: schema, fake, autograd and the entry the public layer calls;
ops/<op>/{cpu,triton,cuda}.py: one file per backend); ops/_common.py: what they share."""
from . import contrastive, convex, inner_loop, labeled, siglip  # noqa: F401  (registers the ops)
