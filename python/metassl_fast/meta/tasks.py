"""Sampled few-shot tasks -> the (T, S, D) / (T, Q, D) batch that the fused heads take.

A task is what a learn2learn ``TaskDataset.sample()`` (or any sampler) returns: a pair
(data (N, ...), labels (N,)) holding `ways` classes with the same number of examples
each, in any order and with any integer labels.  stack_tasks relabels each task's
classes 0..ways-1 (in increasing order of their labels), splits every class into
support and query examples, and, given a backbone, embeds all tasks' data in one
forward instead of one per task.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import torch
from torch import Tensor

from .. import _validate


class TaskBatch(NamedTuple):
    """support (T, S, ...), support_labels (T, S), query (T, Q, ...), query_labels (T, Q);
    S = ways * shots, Q = ways * query_shots, labels int64 in [0, ways), class-major
    (the examples of class 0 first).  Unpacks into ANILHead / anil_loss / proto_loss:
    ``head(*batch)``."""
    support: Tensor
    support_labels: Tensor
    query: Tensor
    query_labels: Tensor


def _count(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def split_positions(n: int, shots: int, query_shots: int) -> tuple[Tensor, Tensor]:
    """Positions, among a class's n examples in the order they came, of its support and
    query examples: alternately support, query, support, ... (learn2learn's ANIL examples
    take the even ones for adaptation and the odd ones for evaluation), the rest to the
    set that still needs examples once the other is full."""
    order = []
    s = q = 0
    for _ in range(shots + query_shots):
        take_support = s < shots and (q >= query_shots or s <= q)
        order.append(take_support)
        s, q = s + take_support, q + (not take_support)
    mask = torch.tensor(order, dtype=torch.bool)
    positions = torch.arange(shots + query_shots)
    return positions[mask], positions[~mask]


def _task_list(tasks: object, n_tasks: object) -> list:
    if hasattr(tasks, "sample") and callable(tasks.sample):  # a TaskDataset: draw n_tasks
        if n_tasks is None:
            raise TypeError(f"tasks is a {type(tasks).__name__} with .sample(): pass n_tasks, the number of tasks "
                            f"to draw from it")
        return [tasks.sample() for _ in range(_count("n_tasks", n_tasks))]
    if n_tasks is not None:
        raise TypeError("n_tasks is only for a TaskDataset-like tasks (one with .sample()); tasks is a sequence of "
                        "(data, labels) pairs already")
    if isinstance(tasks, (str, bytes, Tensor)) or not isinstance(tasks, Sequence):
        raise TypeError(f"tasks must be a list of (data, labels) pairs or an object with .sample() (a learn2learn "
                        f"TaskDataset), got {type(tasks).__name__}")
    if len(tasks) == 0:
        raise ValueError("tasks is empty: need at least one (data, labels) task")
    return list(tasks)


def _class_order(t: int, labels: Tensor, ways: int, per_class: int | None) -> Tensor:
    """(ways, n) indices of task t's examples, class by class in increasing label order,
    each class's in the order they came; checks ways and the per-class count."""
    classes, inverse, counts = torch.unique(labels, sorted=True, return_inverse=True, return_counts=True)
    if classes.numel() != ways:
        raise ValueError(f"tasks[{t}] holds {classes.numel()} classes, expected ways={ways} (labels "
                         f"{classes.tolist()[:10]}{'...' if classes.numel() > 10 else ''})")
    n = int(counts[0]) if per_class is None else per_class
    if bool((counts != n).any()):
        c = int((counts != n).nonzero()[0])
        why = ("like its first class (every class of every task needs the same number)" if per_class is None
               else "= shots + query_shots")
        raise ValueError(f"tasks[{t}]: class {classes[c].item()} has {int(counts[c])} examples, expected {n} {why}")
    return torch.argsort(inverse, stable=True).reshape(ways, n)


def stack_tasks(tasks: Sequence[tuple[Tensor, Tensor]] | object, shots: int, ways: int, *,
                query_shots: int | None = None, backbone: Callable[[Tensor], Tensor] | None = None,
                n_tasks: int | None = None, device: torch.device | str | None = None) -> TaskBatch:
    """Stack T sampled tasks into one batch for the fused heads.

    tasks: a list of T (data (N, ...), labels (N,)) pairs, as learn2learn's
        ``TaskDataset.sample()`` returns them (a list or tuple of two tensors), or an
        object with ``.sample()`` (a TaskDataset) together with n_tasks=T.  Every task
        holds `ways` classes of N / ways examples each, in any order; data of one shape
        (N, ...) and device across tasks; labels any integer dtype and values.
    shots: support examples per class.  query_shots: query examples per class; None
        (default): all the rest, e.g. learn2learn's ``FusedNWaysKShots(k=2 * shots)``
        tasks split in halves.  Each class must have exactly shots + query_shots
        examples.  They are split alternately (support, query, support, ...: for
        query_shots == shots the even and odd ones, as learn2learn's ANIL example
        does), the remaining ones to whichever set is not full yet.
    backbone: None, or a callable (an nn.Module) mapping (T * N, ...) data to
        (T * N, D) features: it runs once, on all tasks' data concatenated in task
        order, and the batch holds features.  (A BatchNorm in training mode then sees
        one batch of all tasks, where a per-task loop shows it one task at a time.)
    device: where the data goes before the backbone (default: where it is).

    Returns TaskBatch(support (T, ways * shots, D or ...), support_labels (T, ways * shots),
    query (T, ways * query_shots, D or ...), query_labels (T, ways * query_shots)),
    labels int64 in [0, ways): each task's classes relabelled 0..ways-1 in increasing
    order of their labels; examples class-major.
    """
    task_list = _task_list(tasks, n_tasks)
    shots, ways = _count("shots", shots), _count("ways", ways)
    if query_shots is not None:
        query_shots = _count("query_shots", query_shots)
    if backbone is not None and not callable(backbone):
        raise TypeError(f"backbone must be callable (an nn.Module), got {type(backbone).__name__}")

    datas, orders = [], []
    for t, task in enumerate(task_list):
        if isinstance(task, (str, bytes, Tensor)) or not isinstance(task, Sequence) or len(task) != 2:
            raise TypeError(f"tasks[{t}] must be a (data, labels) pair, got {type(task).__name__}"
                            + (f" of length {len(task)}" if isinstance(task, Sequence) else ""))
        data, labels = task
        if not isinstance(data, Tensor):
            raise TypeError(f"tasks[{t}] data must be a torch.Tensor, got {type(data).__name__}")
        if not isinstance(labels, Tensor):
            raise TypeError(f"tasks[{t}] labels must be a torch.Tensor, got {type(labels).__name__}")
        _validate.dense(f"tasks[{t}] data", data)
        _validate.dense(f"tasks[{t}] labels", labels)
        if labels.dtype not in _validate.INT_DTYPES:
            raise TypeError(f"tasks[{t}] labels must be integers (class ids), got {labels.dtype}: cast them with "
                            f".long()")
        if data.dim() == 0 or labels.dim() != 1 or labels.shape[0] != data.shape[0]:
            raise ValueError(f"tasks[{t}]: labels must have shape (N,) with N = data.shape[0], one label per "
                             f"example; got data {tuple(data.shape)} and labels {tuple(labels.shape)}")
        if t and (data.shape[1:] != datas[0].shape[1:] or data.dtype != datas[0].dtype):
            raise ValueError(f"tasks[{t}] data is {data.dtype} {tuple(data.shape)}, tasks[0]'s is "
                             f"{datas[0].dtype} {tuple(datas[0].shape)}: every task's examples need one shape "
                             f"and dtype")
        if device is None and t and data.device != datas[0].device:
            raise ValueError(f"tasks[{t}] data is on {data.device} but tasks[0]'s is on {datas[0].device}: pass "
                             f"device= to move them")
        if query_shots is None and data.shape[0] < ways * (shots + 1):
            raise ValueError(f"tasks[{t}] has {data.shape[0]} examples, too few for ways={ways} x (shots={shots} "
                             f"+ at least 1 query)")
        if query_shots is not None and data.shape[0] < ways * (shots + query_shots):
            raise ValueError(f"tasks[{t}] has {data.shape[0]} examples, too few for ways={ways} x (shots={shots} "
                             f"+ query_shots={query_shots})")
        # a uint64 label past int64's range wraps, but only compares with its own kind
        orders.append(_class_order(t, labels.detach().cpu().long(), ways,
                                   None if query_shots is None else shots + query_shots))
        if t and orders[t].shape != orders[0].shape:
            raise ValueError(f"tasks[{t}] has {orders[t].shape[1]} examples per class, tasks[0] has "
                             f"{orders[0].shape[1]}: every task needs the same number")
        datas.append(data)

    per_class = orders[0].shape[1]
    if query_shots is None:
        query_shots = per_class - shots
    s_pos, q_pos = split_positions(per_class, shots, query_shots)
    T, N = len(datas), datas[0].shape[0]
    # row of each support / query example in the (T * N, ...) concatenation
    offsets = (torch.arange(T) * N).view(T, 1, 1)
    rows = torch.stack(orders) + offsets  # (T, ways, n)
    s_rows, q_rows = rows[:, :, s_pos].reshape(-1), rows[:, :, q_pos].reshape(-1)

    x = torch.cat(datas) if device is None else torch.cat([d.to(device) for d in datas])
    if backbone is not None:
        x = backbone(x)
        if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[0] != T * N:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"backbone must return (T * N, D) = ({T * N}, D) features for the {T} x {N} examples, "
                             f"got {got} (flatten inside it, e.g. learn2learn's x.view(-1, D))")
    rest = x.shape[1:]
    support = x.index_select(0, s_rows.to(x.device)).reshape(T, ways * shots, *rest)
    query = x.index_select(0, q_rows.to(x.device)).reshape(T, ways * query_shots, *rest)
    classes = torch.arange(ways, device=x.device)
    support_labels = classes.repeat_interleave(shots).expand(T, -1).contiguous()
    query_labels = classes.repeat_interleave(query_shots).expand(T, -1).contiguous()
    return TaskBatch(support, support_labels, query, query_labels)
