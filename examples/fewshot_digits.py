"""Few-shot classification with an ANIL head on scikit-learn's bundled digits.

Classes 0-4 are meta-train, 5-9 meta-test.  Features are the 8x8 pixels standardised
with statistics of the meta-train classes only.  An ANIL head
(metassl_fast.meta.ANILHead: K inner SGD steps on each task's support set, exact
second-order meta-gradients, all tasks of a batch in one fused call) meta-learns its
initialisation and its inner step size on 5-way tasks of the meta-train classes.
Then 5-way 1-shot and 5-shot accuracy on the meta-test classes is printed for the
adapted head and for the same head without adaptation (steps=0), which has never
seen those classes and can only guess.

The head starts at zero: each task relabels its classes at random, so no fixed
initialisation can favour a class.  (Meta-training an encoder as well overfits the
five meta-train classes here: with a two-layer MLP, 1-shot meta-test accuracy fell
from 0.72 to 0.41 over 300 iterations, so the example keeps the features fixed.)

    python examples/fewshot_digits.py            # under 30 s on 2 CPU cores
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from metassl_fast import meta


def load_digits_by_class(train_classes):
    """{class: (n, 64) standardised pixels}, with the statistics of train_classes only."""
    from sklearn.datasets import load_digits  # ships with scikit-learn: no download

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32)
    y = torch.tensor(y)
    train = torch.cat([x[y == c] for c in train_classes])
    mean, std = train.mean(0), train.std(0) + 0.1  # + 0.1: border pixels are almost constant
    return {c: (x[y == c] - mean) / std for c in range(10)}


def sample_tasks(by_class, classes, n_tasks, n_way, k_shot, n_query, gen):
    """(support (T, n_way*k_shot, 64), labels, query (T, n_way*n_query, 64), labels);
    each task relabels its classes 0..n_way-1."""
    sx, sy, qx, qy = [], [], [], []
    for _ in range(n_tasks):
        chosen = [classes[i] for i in torch.randperm(len(classes), generator=gen)[:n_way]]
        s, sl, q, ql = [], [], [], []
        for label, c in enumerate(chosen):
            pool = by_class[c]
            idx = torch.randperm(len(pool), generator=gen)[: k_shot + n_query]
            s.append(pool[idx[:k_shot]])
            q.append(pool[idx[k_shot:]])
            sl += [label] * k_shot
            ql += [label] * n_query
        sx.append(torch.cat(s))
        qx.append(torch.cat(q))
        sy.append(torch.tensor(sl))
        qy.append(torch.tensor(ql))
    return torch.stack(sx), torch.stack(sy), torch.stack(qx), torch.stack(qy)


def evaluate(head, by_class, classes, k_shot, steps, n_tasks, gen):
    """Mean query accuracy of the head adapted with `steps` inner steps."""
    saved = head.steps
    head.steps = steps
    sx, sy, qx, qy = sample_tasks(by_class, classes, n_tasks, 5, k_shot, 15, gen)
    _, acc = head(sx, sy, qx, qy)
    head.steps = saved
    return acc.item()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=300, help="meta-training iterations")
    p.add_argument("--tasks", type=int, default=16, help="tasks per meta-batch")
    p.add_argument("--steps", type=int, default=5, help="inner SGD steps")
    p.add_argument("--eval-tasks", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    train_classes, test_classes = [0, 1, 2, 3, 4], [5, 6, 7, 8, 9]
    by_class = load_digits_by_class(train_classes)
    head = meta.ANILHead(in_features=64, n_way=5, lr=0.1, steps=args.steps, learn_lr=True)
    nn.init.zeros_(head.linear.weight)
    nn.init.zeros_(head.linear.bias)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)

    t0 = time.perf_counter()
    for it in range(args.iters):
        k_shot = 1 if it % 2 == 0 else 5
        sx, sy, qx, qy = sample_tasks(by_class, train_classes, args.tasks, 5, k_shot, 15, gen)
        loss, acc = head(sx, sy, qx, qy)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (it + 1) % max(1, args.iters // 5) == 0:
            print(f"iter {it + 1:4d}  meta-train loss {loss.item():.3f}  query acc {acc.item():.3f}  "
                  f"inner lr {head.lr.item():.3f}  ({time.perf_counter() - t0:.1f} s)")

    print(f"\nmeta-test classes {test_classes}, 5-way, {args.eval_tasks} tasks, 15 queries per class:")
    results = {}
    for k_shot in (1, 5):
        adapted = evaluate(head, by_class, test_classes, k_shot, args.steps, args.eval_tasks, gen)
        frozen = evaluate(head, by_class, test_classes, k_shot, 0, args.eval_tasks, gen)
        results[k_shot] = (adapted, frozen)
        print(f"  {k_shot}-shot: ANIL head adapted ({args.steps} steps) {adapted:.3f}   "
              f"no adaptation {frozen:.3f}   (chance 0.200)")
    print(f"total {time.perf_counter() - t0:.1f} s")
    return results


if __name__ == "__main__":
    main()
