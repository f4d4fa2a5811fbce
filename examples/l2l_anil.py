"""learn2learn's ANIL loop in one fused call, on scikit-learn's bundled digits.

learn2learn's ANIL example (examples/vision/anil_fc100.py) wraps the head in
``l2l.algorithms.MAML``, and per meta-batch loops over tasks: ``head.clone()``, the
backbone on that task, ``adapt()`` per inner step, ``backward()`` per task, then the
gradients rescaled by 1 / meta_bsz.  Here the same training runs as

    batch = stack_tasks(taskset, shots, ways, n_tasks=meta_bsz, backbone=features)
    loss, acc = head(*batch)          # head = ANILHead.from_linear(nn.Linear(D, ways), ...)
    loss.backward()

one backbone forward for all tasks, one fused inner-loop call with exact second-order
meta-gradients.  learn2learn itself does not build on Python 3.11, so its loop is
written out in plain torch (``per_task_step``: functional adaptation with
torch.autograd.grad(create_graph=True), which is what MAML.clone() / adapt() do), and
the script checks in float64 that the two give the same loss and gradients on one batch,
then times both on the same batches and meta-trains with ours.

Data: digits 0-6 are meta-train classes, 7-9 meta-test (3-way tasks: only 3 classes are
left for testing).  ``DigitsTaskset`` stands in for learn2learn's TaskDataset with
``FusedNWaysKShots(k=2 * shots)``, ``RemapLabels`` and ``ConsecutiveLabels``: .sample()
returns (data (ways * 2 * shots, 1, 8, 8), labels (ways * 2 * shots,)), classes grouped,
labels 0..ways-1 in random order.

    python examples/l2l_anil.py              # about 12 s on 2 idle CPU cores
    OMP_NUM_THREADS=1 python examples/l2l_anil.py   # on a busy machine (2 threads per process oversubscribe it)
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import time

import torch
import torch.nn.functional as F
from torch import nn

from metassl_fast.meta.modules import ANILHead
from metassl_fast.meta.tasks import stack_tasks

TRAIN_CLASSES, TEST_CLASSES = list(range(7)), [7, 8, 9]


class DigitsTaskset:
    """A learn2learn TaskDataset look-alike: sample() -> (data, labels) of one task."""

    def __init__(self, images, labels, classes, ways, shots_per_class, generator):
        self.by_class = [images[labels == c] for c in classes]
        self.ways, self.k, self.gen = ways, shots_per_class, generator

    def sample(self):
        chosen = torch.randperm(len(self.by_class), generator=self.gen)[: self.ways].tolist()
        data, labels = [], []
        for label, c in enumerate(chosen):
            pool = self.by_class[c]
            data.append(pool[torch.randperm(len(pool), generator=self.gen)[: self.k]])
            labels += [label] * self.k
        return torch.cat(data), torch.tensor(labels)


def load_digits_images():
    """(1797, 1, 8, 8) pixels scaled to [0, 1], (1797,) labels."""
    from sklearn.datasets import load_digits  # ships with scikit-learn: no download

    x, y = load_digits(return_X_y=True)
    return torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0, torch.tensor(y)


def make_backbone():
    """A small conv net (learn2learn's ConvBase in miniature): (N, 1, 8, 8) -> (N, 128)."""
    return nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten())


def fused_step(features, head, tasks, shots, ways):
    """Ours: one backbone forward, one fused call.  -> (loss, accuracy)."""
    return head(*stack_tasks(tasks, shots, ways, backbone=features))


def per_task_step(features, linear, tasks, shots, ways, lr, steps):
    """learn2learn's loop in plain torch: per task the backbone, `steps` differentiable SGD
    steps on a functional copy of the head (MAML.clone() / adapt()), the query loss and its
    backward; gradients rescaled by 1 / number of tasks as anil_fc100.py does.
    -> (mean loss, mean accuracy), the gradients left in .grad."""
    total_loss = total_acc = 0.0
    for data, labels in tasks:
        x = features(data)
        adapt = torch.zeros(len(x), dtype=torch.bool)
        adapt[torch.arange(shots * ways) * 2] = True  # even ones adapt, odd ones evaluate
        w, b = linear.weight, linear.bias
        for _ in range(steps):
            inner = F.cross_entropy(F.linear(x[adapt], w, b), labels[adapt])
            gw, gb = torch.autograd.grad(inner, (w, b), create_graph=True)
            w, b = w - lr * gw, b - lr * gb
        logits = F.linear(x[~adapt], w, b)
        loss = F.cross_entropy(logits, labels[~adapt])
        loss.backward()
        total_loss += loss.item()
        total_acc += (logits.argmax(1) == labels[~adapt]).float().mean().item()
    for p in list(features.parameters()) + list(linear.parameters()):
        p.grad.mul_(1.0 / len(tasks))
    return total_loss / len(tasks), total_acc / len(tasks)


def check_same_gradients(features, head, tasks, shots, ways):
    """Both steps in float64 on one batch: the same loss and the same gradient of every
    parameter (backbone and head).  -> the largest relative gradient difference."""
    f64, h64 = copy.deepcopy(features).double(), copy.deepcopy(head).double()
    tasks64 = [(x.double(), y) for x, y in tasks]
    loss, _ = fused_step(f64, h64, tasks64, shots, ways)
    ours = torch.autograd.grad(loss, list(f64.parameters()) + [h64.linear.weight, h64.linear.bias])
    ref_loss, _ = per_task_step(f64, h64.linear, tasks64, shots, ways, h64.lr.item(), h64.steps)
    ref = [p.grad for p in list(f64.parameters()) + [h64.linear.weight, h64.linear.bias]]
    torch.testing.assert_close(loss.item(), ref_loss, rtol=1e-10, atol=1e-12)
    worst = 0.0
    for a, r in zip(ours, ref):
        torch.testing.assert_close(a, r, rtol=1e-8, atol=1e-10)
        worst = max(worst, ((a - r).abs().max() / r.abs().max().clamp_min(1e-30)).item())
    return worst


def meta_test(features, head, taskset, shots, ways, n_tasks, steps):
    """Mean query accuracy over n_tasks meta-test tasks, the head adapted `steps` steps."""
    saved, head.steps = head.steps, steps
    with torch.no_grad():  # the fused op adapts in closed form: no autograd graph needed
        _, acc = fused_step(features, head, [taskset.sample() for _ in range(n_tasks)], shots, ways)
    head.steps = saved
    return acc.item()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=int(os.environ.get("L2L_ANIL_ITERS", 300)),
                   help="meta-training iterations with ours (env L2L_ANIL_ITERS)")
    p.add_argument("--time-iters", type=int, default=20, help="iterations timed for both loops")
    p.add_argument("--ways", type=int, default=3)
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--meta-bsz", type=int, default=16)
    p.add_argument("--fast-lr", type=float, default=0.5)
    p.add_argument("--adapt-steps", type=int, default=5)
    p.add_argument("--meta-lr", type=float, default=3e-3)
    p.add_argument("--eval-tasks", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    ways, shots, bsz = args.ways, args.shots, args.meta_bsz

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    images, labels = load_digits_images()
    train_tasks = DigitsTaskset(images, labels, TRAIN_CLASSES, ways, 2 * shots, gen)
    test_tasks = DigitsTaskset(images, labels, TEST_CLASSES, ways, 2 * shots, gen)
    features = make_backbone()
    d = features(images[:1]).shape[1]
    head = ANILHead.from_linear(nn.Linear(d, ways), lr=args.fast_lr, steps=args.adapt_steps)
    print(f"{ways}-way {shots}-shot, meta-batch {bsz}, {args.adapt_steps} inner steps (second order), "
          f"backbone -> D={d}; {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, torch threads: {torch.get_num_threads()}")

    before = meta_test(features, head, test_tasks, shots, ways, args.eval_tasks, args.adapt_steps)
    batch = [train_tasks.sample() for _ in range(bsz)]
    worst = check_same_gradients(features, head, batch, shots, ways)
    print(f"float64, one batch: loss equal, every gradient equal to the per-task loop's "
          f"(max relative difference {worst:.1e})")

    # Timing: both from the same start, on the same batches, each with its own Adam.
    ref_features, ref_linear = copy.deepcopy(features), copy.deepcopy(head.linear)
    ref_opt = torch.optim.Adam(list(ref_features.parameters()) + list(ref_linear.parameters()), lr=args.meta_lr)
    opt = torch.optim.Adam(list(features.parameters()) + list(head.parameters()), lr=args.meta_lr)
    elapsed = {"ours": 0.0, "per-task loop": 0.0}
    timed = min(args.time_iters, args.iters)
    t_train = time.perf_counter()
    for it in range(args.iters):
        batch = [train_tasks.sample() for _ in range(bsz)]
        if it < timed:
            t0 = time.perf_counter()
            ref_opt.zero_grad()
            per_task_step(ref_features, ref_linear, batch, shots, ways, args.fast_lr, args.adapt_steps)
            ref_opt.step()
            elapsed["per-task loop"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        opt.zero_grad()
        loss, acc = fused_step(features, head, batch, shots, ways)
        loss.backward()
        opt.step()
        if it < timed:
            elapsed["ours"] += time.perf_counter() - t0
        if (it + 1) % max(1, args.iters // 5) == 0:
            print(f"iter {it + 1:4d}  meta-train loss {loss.item():.3f}  query acc {acc.item():.3f}  "
                  f"({time.perf_counter() - t_train:.1f} s)")
    ms = {k: 1e3 * v / timed for k, v in elapsed.items()} if timed else {}
    if timed:
        print(f"ms per meta-training iteration over {timed} iterations (stacking, backbone, inner loop, backward, "
              f"Adam): ours {ms['ours']:.1f}, learn2learn-style per-task loop {ms['per-task loop']:.1f} "
              f"({ms['per-task loop'] / ms['ours']:.1f}x)")

    adapted = meta_test(features, head, test_tasks, shots, ways, args.eval_tasks, args.adapt_steps)
    frozen = meta_test(features, head, test_tasks, shots, ways, args.eval_tasks, 0)
    print(f"meta-test classes {TEST_CLASSES}, {args.eval_tasks} tasks, {shots} queries per class: accuracy "
          f"adapted ({args.adapt_steps} steps) {adapted:.3f} (before meta-training {before:.3f}), no adaptation "
          f"{frozen:.3f} (chance {1 / ways:.3f})")
    print(f"total {time.perf_counter() - t_train:.1f} s")
    return {"adapted": adapted, "before": before, "frozen": frozen, "ms": ms, "max_grad_rel_diff": worst, "ways": ways}


if __name__ == "__main__":
    main()
