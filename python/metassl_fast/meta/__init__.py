"""Batched few-shot meta-learning heads: many tasks adapted in one fused call.
anil.py: adapt_linear_head, anil_loss (ANIL / Meta-SGD); proto.py: proto_loss;
modules.py: ANILHead; convex.py: ridge_loss, svm_loss, logreg_loss, fit_*, ConvexHead
(MetaOptNet / R2-D2 heads); tasks.py: stack_tasks, TaskBatch (sampled tasks, e.g. a learn2learn
TaskDataset's, as one batch).  The ops behind them: ops/inner_loop, ops/convex."""
from .anil import adapt_linear_head, anil_loss
from .convex import ConvexHead, fit_logreg, fit_ridge, fit_svm, logreg_loss, ridge_loss, svm_loss
from .modules import ANILHead
from .proto import proto_loss
from .tasks import TaskBatch, stack_tasks

__all__ = ["ANILHead", "ConvexHead", "adapt_linear_head", "anil_loss", "fit_logreg", "fit_ridge", "fit_svm",
           "logreg_loss", "proto_loss", "ridge_loss", "stack_tasks", "svm_loss", "TaskBatch"]
