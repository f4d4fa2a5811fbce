"""The path for learn2learn users: stack_tasks, ANILHead.from_linear, proto_loss's scale and
1/D, and examples/l2l_anil.py."""
from __future__ import annotations

import copy
import importlib.util
import pathlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metassl_fast.meta.anil import anil_loss
from metassl_fast.meta.modules import ANILHead
from metassl_fast.meta.proto import proto_loss
from metassl_fast.meta.tasks import TaskBatch, split_positions, stack_tasks

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


class StandInTaskset:
    """learn2learn's TaskDataset interface: sample() -> [data, labels] (a list, as
    learn2learn returns it), here `ways` classes with arbitrary labels in shuffled order."""

    def __init__(self, ways=3, per_class=4, feature_shape=(2, 3), seed=0):
        self.ways, self.per_class, self.shape = ways, per_class, feature_shape
        self.gen = torch.Generator().manual_seed(seed)
        self.calls = 0

    def sample(self):
        self.calls += 1
        classes = torch.randperm(50, generator=self.gen)[: self.ways] + 100  # labels far from 0..ways-1
        labels = classes.repeat_interleave(self.per_class)
        perm = torch.randperm(len(labels), generator=self.gen)
        data = torch.randn(len(labels), *self.shape, generator=self.gen, dtype=torch.float64)
        return [data, labels[perm]]


class CountingBackbone(nn.Module):
    def __init__(self, in_features, out_features):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, dtype=torch.float64)
        self.calls = []

    def forward(self, x):
        self.calls.append(x.shape[0])
        return self.linear(x.flatten(1))


# --------------------------------------------------------------------------- stack_tasks

def test_split_positions_alternate_then_fill():
    s, q = split_positions(10, 5, 5)
    assert s.tolist() == [0, 2, 4, 6, 8] and q.tolist() == [1, 3, 5, 7, 9]  # learn2learn's even / odd
    s, q = split_positions(6, 5, 1)
    assert s.tolist() == [0, 2, 3, 4, 5] and q.tolist() == [1]
    s, q = split_positions(4, 1, 3)
    assert s.tolist() == [0] and q.tolist() == [1, 2, 3]


@pytest.mark.parametrize("query_shots", [None, 2, 3])
def test_stack_tasks_shapes_relabelling_and_split(query_shots):
    shots = 4 - (query_shots or 2)
    taskset = StandInTaskset(ways=3, per_class=4)
    tasks = [taskset.sample() for _ in range(5)]
    batch = stack_tasks(tasks, shots, 3, query_shots=query_shots)
    assert isinstance(batch, TaskBatch)
    q = 4 - shots
    assert batch.support.shape == (5, 3 * shots, 2, 3) and batch.query.shape == (5, 3 * q, 2, 3)
    assert batch.support_labels.dtype == batch.query_labels.dtype == torch.int64
    assert batch.support_labels.tolist() == [sum([[c] * shots for c in range(3)], [])] * 5
    assert batch.query_labels.tolist() == [sum([[c] * q for c in range(3)], [])] * 5
    s_pos, q_pos = split_positions(4, shots, q)
    for t, (data, labels) in enumerate(tasks):
        for new, old in enumerate(sorted(set(labels.tolist()))):  # classes in increasing label order
            rows = data[labels == old]  # in the order they came
            torch.testing.assert_close(batch.support[t, new * shots:(new + 1) * shots], rows[s_pos], rtol=0, atol=0)
            torch.testing.assert_close(batch.query[t, new * q:(new + 1) * q], rows[q_pos], rtol=0, atol=0)


def test_stack_tasks_from_a_taskset_runs_the_backbone_once():
    taskset = StandInTaskset(ways=3, per_class=4)
    backbone = CountingBackbone(6, 5)
    batch = stack_tasks(taskset, 2, 3, n_tasks=7, backbone=backbone)
    assert taskset.calls == 7
    assert backbone.calls == [7 * 12]  # one forward, all tasks' examples
    assert batch.support.shape == (7, 6, 5) and batch.query.shape == (7, 6, 5)
    # the same as embedding each task on its own: the split and the features agree
    replay = StandInTaskset(ways=3, per_class=4)
    tasks = [replay.sample() for _ in range(7)]
    per_task = stack_tasks(tasks, 2, 3)
    with torch.no_grad():
        torch.testing.assert_close(batch.support, backbone.linear(per_task.support.flatten(2)), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(batch.query, backbone.linear(per_task.query.flatten(2)), rtol=1e-12, atol=1e-12)
    batch.support.sum().backward()  # the features stay in the backbone's graph
    assert backbone.linear.weight.grad is not None


def test_stack_tasks_matches_learn2learn_even_odd_split_with_remapped_labels():
    """A task as learn2learn's FusedNWaysKShots(k=2*shots) + ConsecutiveLabels gives it:
    classes grouped, labels 0..ways-1: support = the even rows, query = the odd ones."""
    ways, shots = 3, 2
    data = torch.randn(ways * 2 * shots, 4)
    labels = torch.arange(ways).repeat_interleave(2 * shots)
    batch = stack_tasks([(data, labels)], shots, ways)
    even = torch.zeros(len(data), dtype=torch.bool)
    even[torch.arange(shots * ways) * 2] = True
    torch.testing.assert_close(batch.support[0], data[even], rtol=0, atol=0)
    torch.testing.assert_close(batch.query[0], data[~even], rtol=0, atol=0)
    assert torch.equal(batch.support_labels[0], labels[even]) and torch.equal(batch.query_labels[0], labels[~even])


def _task(ways=3, per_class=4, d=5, labels=None):
    labels = torch.arange(ways).repeat_interleave(per_class) if labels is None else labels
    return (torch.randn(len(labels), d), labels)


@pytest.mark.parametrize("call, error, match", [
    (lambda: stack_tasks([], 2, 3), ValueError, "tasks is empty"),
    (lambda: stack_tasks(torch.zeros(3), 2, 3), TypeError, "tasks must be a list"),
    (lambda: stack_tasks(StandInTaskset(), 2, 3), TypeError, "n_tasks"),
    (lambda: stack_tasks([_task()], 2, 3, n_tasks=2), TypeError, "n_tasks"),
    (lambda: stack_tasks(StandInTaskset(), 2, 3, n_tasks=0), ValueError, "n_tasks must be >= 1"),
    (lambda: stack_tasks([_task()], 0, 3), ValueError, "shots must be >= 1"),
    (lambda: stack_tasks([_task()], 2.0, 3), TypeError, "shots must be an int"),
    (lambda: stack_tasks([_task()], 2, True), TypeError, "ways must be an int"),
    (lambda: stack_tasks([_task()], 2, 3, query_shots=0), ValueError, "query_shots must be >= 1"),
    (lambda: stack_tasks([_task()], 2, 3, backbone="net"), TypeError, "backbone must be callable"),
    (lambda: stack_tasks([_task(), _task(ways=2, per_class=6)], 2, 3), ValueError, r"tasks\[1\] holds 2 classes"),
    (lambda: stack_tasks([_task(), _task(per_class=6)], 2, 3), ValueError, r"tasks\[1\] has 6 examples per class"),
    (lambda: stack_tasks([_task(labels=torch.tensor([0] * 5 + [1] * 4 + [2] * 3))], 2, 3), ValueError,
     "class 1 has 4 examples, expected 5"),
    (lambda: stack_tasks([_task(per_class=2)], 2, 3), ValueError, "too few"),
    (lambda: stack_tasks([_task()], 2, 3, query_shots=3), ValueError, "too few"),
    (lambda: stack_tasks([_task(per_class=6)], 2, 3, query_shots=3), ValueError,
     "has 6 examples, expected 5 = shots \\+ query_shots"),
    (lambda: stack_tasks([(torch.randn(12, 5), torch.arange(3).repeat_interleave(4).float())], 2, 3), TypeError,
     r"tasks\[0\] labels must be integers"),
    (lambda: stack_tasks([(torch.randn(11, 5), torch.arange(3).repeat_interleave(4))], 2, 3), ValueError,
     "one label per example"),
    (lambda: stack_tasks([(torch.randn(12, 5), [0] * 12)], 2, 3), TypeError, r"tasks\[0\] labels must be a torch"),
    (lambda: stack_tasks([(torch.randn(12, 5).numpy(), torch.zeros(12, dtype=torch.long))], 2, 3), TypeError,
     r"tasks\[0\] data must be a torch"),
    (lambda: stack_tasks([torch.randn(12, 5)], 2, 3), TypeError, r"tasks\[0\] must be a \(data, labels\) pair"),
    (lambda: stack_tasks([_task(), (torch.randn(12, 5), torch.arange(3).repeat_interleave(4), 0)], 2, 3),
     TypeError, r"tasks\[1\] must be a \(data, labels\) pair, got tuple of length 3"),
    (lambda: stack_tasks([_task(), _task(d=4)], 2, 3), ValueError, "one shape"),
    (lambda: stack_tasks([_task()], 2, 3, backbone=lambda x: x.unsqueeze(1)), ValueError,
     r"backbone must return \(T \* N, D\) = \(12, D\)"),
])
def test_stack_tasks_refuses_bad_input_by_name(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_stack_tasks_device_argument_and_any_integer_labels():
    data, labels = _task(labels=torch.tensor([5, -2, 9] * 4, dtype=torch.int16))
    batch = stack_tasks([(data, labels)], 2, 3, device="cpu")
    # classes sorted: -2 -> 0, 5 -> 1, 9 -> 2
    torch.testing.assert_close(batch.support[0, :2], data[labels == -2][[0, 2]], rtol=0, atol=0)


# --------------------------------------------------------------------------- ANILHead.from_linear

def _episode(T=3, S=6, Q=9, D=7, C=3, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, S, D, generator=g, dtype=dtype)
    xq = torch.randn(T, Q, D, generator=g, dtype=dtype)
    return x, torch.arange(C).repeat(S // C).expand(T, -1), xq, torch.arange(C).repeat(Q // C).expand(T, -1)


def test_from_linear_shares_the_parameters():
    linear = nn.Linear(7, 3, dtype=torch.float64)
    opt = torch.optim.SGD(linear.parameters(), lr=0.1)  # made before the head: keeps working
    head = ANILHead.from_linear(linear, lr=0.3, steps=2)
    assert head.linear is linear
    assert head.linear.weight is linear.weight and head.linear.bias is linear.bias
    assert {id(p) for p in linear.parameters()} <= {id(p) for p in head.parameters()}
    assert head.lr.item() == pytest.approx(0.3) and head.steps == 2 and head.lr.dtype == torch.float64
    assert list(head.state_dict()) == list(ANILHead(7, 3).state_dict())  # checkpoints load either way
    before = linear.weight.detach().clone()
    loss, acc = head(*_episode())
    loss.backward()
    assert linear.weight.grad is not None and linear.bias.grad is not None
    opt.step()
    assert not torch.equal(linear.weight, before)


def test_from_linear_equals_an_anil_head_with_copied_weights():
    linear = nn.Linear(7, 3, dtype=torch.float64)
    shared = ANILHead.from_linear(linear, lr=0.4, steps=3, learn_lr=True)
    copied = ANILHead(7, 3, lr=0.4, steps=3, learn_lr=True).double()
    copied.linear.load_state_dict(copy.deepcopy(linear.state_dict()))
    batch = _episode()
    (l1, a1), (l2, a2) = shared(*batch), copied(*batch)
    torch.testing.assert_close(l1, l2, rtol=0, atol=0)
    assert a1 == a2
    g1 = torch.autograd.grad(l1, [linear.weight, linear.bias, shared.lr])
    g2 = torch.autograd.grad(l2, [copied.linear.weight, copied.linear.bias, copied.lr])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # lr: the head's float32 Parameter (0.4 rounded), as ANILHead's own
    ref = anil_loss(*batch, linear.weight, linear.bias, lr=shared.lr.detach(), steps=3, backend="torch")
    torch.testing.assert_close(l1, ref, rtol=1e-10, atol=1e-12)


def test_from_linear_meta_sgd_and_float32():
    head = ANILHead.from_linear(nn.Linear(7, 3), per_param_lr=True, learn_lr=True)
    assert head.lr_weight.shape == (3, 7) and head.lr_weight.dtype == torch.float32
    loss, _ = head(*_episode(dtype=torch.float32))
    loss.backward()
    assert head.lr_weight.grad is not None and head.linear.weight.grad is not None


class FakeMAML(nn.Module):  # learn2learn's MAML keeps the wrapped model as .module
    def __init__(self, module):
        super().__init__()
        self.module = module


@pytest.mark.parametrize("make, error, match", [
    (lambda: ANILHead.from_linear(nn.Conv1d(3, 3, 1)), TypeError, "linear must be a torch.nn.Linear, got Conv1d"),
    (lambda: ANILHead.from_linear(FakeMAML(nn.Linear(4, 2))), TypeError, r"\.module: pass that"),
    (lambda: ANILHead.from_linear(nn.Linear(4, 2, bias=False)), ValueError, "linear has no bias"),
    (lambda: ANILHead.from_linear(nn.LazyLinear(2)), ValueError, "uninitialised"),
    (lambda: ANILHead.from_linear(nn.Linear(4, 2), n_way=2), TypeError, "takes n_way from the Linear"),
    (lambda: ANILHead.from_linear(nn.Linear(4, 2), steps=-1), ValueError, "steps"),
    (lambda: ANILHead.from_linear(nn.Linear(4, 2), lr=float("nan")), ValueError, "lr"),
])
def test_from_linear_refuses_by_name(make, error, match):
    with pytest.raises(error, match=match):
        make()


# --------------------------------------------------------------------------- proto_loss scale, 1/D

def _proto_reference(x, y, xq, yq, scale, by_dim, C=3):
    protos = torch.stack([torch.stack([x[t][y[t] == c].mean(0) for c in range(C)]) for t in range(len(x))])
    d2 = ((xq.unsqueeze(2) - protos.unsqueeze(1)) ** 2).sum(-1)
    if by_dim:
        d2 = d2 / x.shape[-1]
    return F.cross_entropy((-scale * d2).reshape(-1, C), yq.reshape(-1))


@pytest.mark.parametrize("by_dim", [False, True])
@pytest.mark.parametrize("scale_kind", ["float", "tensor", "one-element"])
def test_proto_loss_scale_and_dim_match_the_formula(by_dim, scale_kind):
    x, y, xq, yq = (t.clone() for t in _episode(D=11))
    x.requires_grad_(True)
    xq.requires_grad_(True)
    if scale_kind == "float":
        scale = 2.5
    else:  # MetaOptNet's nn.Parameter(torch.FloatTensor([1.0])) has shape (1,)
        scale = torch.tensor(2.5 if scale_kind == "tensor" else [2.5], dtype=torch.float64, requires_grad=True)
    loss = proto_loss(x, y, xq, yq, scale=scale, normalize_by_dim=by_dim)
    ref = _proto_reference(x, y, xq, yq, scale, by_dim)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    wrt = [x, xq] + ([scale] if isinstance(scale, torch.Tensor) else [])
    for a, b in zip(torch.autograd.grad(loss, wrt), torch.autograd.grad(ref, wrt)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_proto_loss_defaults_unchanged_and_scale_gradcheck():
    x, y, xq, yq = _episode(T=2, S=3, Q=3, D=2)
    assert torch.equal(proto_loss(x, y, xq, yq), proto_loss(x, y, xq, yq, scale=1.0, normalize_by_dim=False))
    xs, xqs = x.clone().requires_grad_(True), xq.clone().requires_grad_(True)
    scale = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)
    for by_dim in (False, True):
        assert torch.autograd.gradcheck(
            lambda a, b, s: proto_loss(a, y, b, yq, scale=s, normalize_by_dim=by_dim, reduction="none"),
            (xs, xqs, scale))


def test_proto_loss_float32_with_a_float32_scale_parameter():
    x, y, xq, yq = _episode(dtype=torch.float32)
    scale = nn.Parameter(torch.FloatTensor([10.0]))
    loss = proto_loss(x, y, xq, yq, scale=scale, normalize_by_dim=True)
    assert loss.dtype == torch.float32
    loss.backward()
    assert scale.grad is not None and scale.grad.shape == (1,)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"scale": 0.0}, ValueError, "scale must be finite and > 0"),
    ({"scale": -1.0}, ValueError, "scale must be finite and > 0"),
    ({"scale": float("inf")}, ValueError, "scale must be finite and > 0"),
    ({"scale": float("nan")}, ValueError, "scale must be finite and > 0"),
    ({"scale": torch.tensor(-2.0)}, ValueError, "scale must be finite and > 0"),
    ({"scale": torch.ones(2)}, ValueError, "scale must be a scalar"),
    ({"scale": torch.tensor(1)}, TypeError, "scale must be a floating tensor"),
    ({"scale": "1"}, TypeError, "scale must be a float"),
    ({"scale": True}, TypeError, "scale must be a float"),
    ({"normalize_by_dim": 1}, TypeError, "normalize_by_dim must be a bool"),
])
def test_proto_loss_refuses_bad_scale_and_flag(kwargs, error, match):
    with pytest.raises(error, match=match):
        proto_loss(*_episode(), **kwargs)


# --------------------------------------------------------------------------- the example

@pytest.mark.skipif(importlib.util.find_spec("sklearn") is None, reason="scikit-learn not installed")
def test_l2l_anil_example_agrees_with_the_per_task_loop_and_learns():
    spec = importlib.util.spec_from_file_location("l2l_anil", EXAMPLES / "l2l_anil.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core machine: 2 threads per process oversubscribe it
    try:
        out = mod.main(["--iters", "30", "--time-iters", "1", "--eval-tasks", "60", "--meta-bsz", "8"])
    finally:
        torch.set_num_threads(threads)
    assert out["max_grad_rel_diff"] < 1e-8  # the float64 check passed (it asserts allclose itself)
    assert out["ms"]["ours"] > 0 and out["ms"]["per-task loop"] > 0
    chance = 1 / out["ways"]
    assert abs(out["frozen"] - chance) < 0.1  # unseen classes, no adaptation: chance
    assert out["adapted"] > chance + 0.15, out
