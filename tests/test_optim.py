"""Row-wise embedding updates (lowrank_ctr.optim): exact against hand-written / torch references on tiny tables."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

from lowrank_ctr.models.layers import FieldEmbedding, sum_rows
from lowrank_ctr.optim import RowWiseOptimizer, build_optimizer, optimizer_name, updates_rows
from lowrank_ctr.optim.rowwise import unique_rows

VOCAB = [5, 7, 4]  # 16 flat rows
DIM = 3


class TinyModel(nn.Module):
    """A table + a dense layer: the smallest model with both kinds of parameters."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.table = FieldEmbedding(VOCAB, DIM, init_std=0.5)
        self.dense = nn.Linear(len(VOCAB) * DIM, 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.dense(self.table(ids).flatten(1)).squeeze(-1)


def batches(steps: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Ids that repeat within a batch and leave some rows untouched (local ids 0..2 only)."""
    g = torch.Generator().manual_seed(1)
    return [(torch.randint(0, 3, (6, len(VOCAB)), generator=g), torch.randint(0, 2, (6,), generator=g).float())
            for _ in range(steps)]


def train(model: nn.Module, opt: torch.optim.Optimizer, data) -> None:
    for ids, y in data:
        opt.zero_grad(set_to_none=True)
        nn.functional.binary_cross_entropy_with_logits(model(ids), y).backward()
        opt.step()


def touched_rows(table: FieldEmbedding, data) -> torch.Tensor:
    return torch.unique(torch.cat([table.flat_ids(ids).reshape(-1) for ids, _ in data]))


@pytest.mark.parametrize("shape", [(6, 3), (6, 3, 2)])
def test_row_gradient_equals_dense_gradient(shape: tuple[int, ...]) -> None:
    table = FieldEmbedding(VOCAB, DIM)
    ids = torch.randint(0, 4, shape, generator=torch.Generator().manual_seed(0))
    upstream = torch.randn(*shape, DIM, generator=torch.Generator().manual_seed(1))
    dense_out = table(ids)
    (dense_out * upstream).sum().backward()
    dense_grad = table.weight.grad.clone()
    table.weight.grad = None
    table.row_gradients = True
    row_out = table(ids)
    (row_out * upstream).sum().backward()
    grad = table.weight.grad
    assert torch.equal(row_out, dense_out)
    assert grad.is_sparse
    rows, _ = unique_rows(grad)
    assert torch.equal(rows, torch.unique(table.flat_ids(ids)))  # one entry per touched row, no coalesce needed
    assert grad._nnz() == rows.numel()
    torch.testing.assert_close(grad.to_dense(), dense_grad, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["csr", "index_add"])  # CPU's default and a GPU's: both run here
def test_sum_rows_sums_each_ids_gradient_rows(method: str) -> None:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 50, (400,), generator=g)
    grad_rows = torch.randn(400, 4, generator=g, dtype=torch.float64)
    rows, summed = sum_rows(ids, grad_rows, method)
    expected = torch.zeros(50, 4, dtype=torch.float64)
    for i, r in zip(ids.tolist(), grad_rows):  # one row at a time: the plain definition
        expected[i] += r
    assert torch.equal(rows, torch.unique(ids))
    torch.testing.assert_close(summed, expected[rows], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="csr.*index_add"):
        sum_rows(ids, grad_rows, "coalesce")


def test_sum_rows_reuses_a_sort_only_for_the_same_ids(monkeypatch) -> None:
    """Two tables looking up the same ids sort once; other ids, or the same tensor changed in place, sort again."""
    from lowrank_ctr.models import layers

    sorts = []
    real_sort = torch.sort
    monkeypatch.setattr(layers.torch, "sort", lambda *a, **k: sorts.append(1) or real_sort(*a, **k))
    layers._SORT_MEMO.clear()
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 30, (200,), generator=g)
    grads = [torch.randn(200, d, generator=g, dtype=torch.float64) for d in (4, 1)]

    def expected(i, grad):
        return torch.zeros(30, grad.shape[1], dtype=grad.dtype).index_add_(0, i, grad)[torch.unique(i)]

    for grad in grads:  # like DeepFM's embedding and first-order table: equal ids, distinct tensors
        rows, summed = sum_rows(ids.clone(), grad, "csr")
        assert torch.equal(rows, torch.unique(ids))
        torch.testing.assert_close(summed, expected(ids, grad), rtol=0, atol=1e-12)
    assert len(sorts) == 1
    held = layers._SORT_MEMO.ids
    held[:100] = (held[:100] + 7) % 30  # the tensor the memo holds, changed in place
    rows, summed = sum_rows(held, grads[0], "csr")
    torch.testing.assert_close(summed, expected(held, grads[0]), rtol=0, atol=1e-12)
    other = torch.randint(0, 30, (200,), generator=g)
    rows, summed = sum_rows(other, grads[0], "csr")
    assert torch.equal(rows, torch.unique(other)) and len(sorts) == 3
    torch.testing.assert_close(summed, expected(other, grads[0]), rtol=0, atol=1e-12)


def test_rowwise_adagrad_matches_reference_and_leaves_untouched_rows() -> None:
    lr, scale, eps = 0.01, 5.0, 1e-8
    model, reference = TinyModel(), TinyModel()
    data = batches()
    opt = build_optimizer(functools.partial(RowWiseOptimizer, lr=lr, rows="adagrad", row_lr_scale=scale,
                                            row_eps=eps), model)
    train(model, opt, data)

    # Reference: dense gradients, row-wise Adagrad written out for the table, torch's Adam for the dense layer.
    start = copy.deepcopy(reference.table.weight.detach())
    table_w = reference.table.weight
    adam = torch.optim.Adam(reference.dense.parameters(), lr=lr)
    acc = torch.zeros(table_w.shape[0])
    for ids, y in data:
        adam.zero_grad(set_to_none=True)
        table_w.grad = None
        nn.functional.binary_cross_entropy_with_logits(reference(ids), y).backward()
        adam.step()
        with torch.no_grad():
            rows = torch.unique(reference.table.flat_ids(ids))
            g = table_w.grad[rows]
            acc[rows] += (g * g).mean(1)
            table_w[rows] -= lr * scale * g / (acc[rows].sqrt() + eps).unsqueeze(1)

    torch.testing.assert_close(model.table.weight, table_w, rtol=0, atol=1e-6)
    torch.testing.assert_close(opt.state[model.table.weight]["row_sum"], acc, rtol=1e-6, atol=1e-9)
    for p, q in zip(model.dense.parameters(), reference.dense.parameters()):
        assert torch.equal(p, q)  # the dense rule is exactly torch's Adam
    untouched = torch.ones(table_w.shape[0], dtype=torch.bool)
    untouched[touched_rows(model.table, data)] = False
    assert untouched.sum() > 0
    assert torch.equal(model.table.weight[untouched], start[untouched])  # bit-identical
    assert not torch.equal(model.table.weight[~untouched], start[~untouched])


def test_rowwise_adam_matches_torch_sparse_adam() -> None:
    model, reference = TinyModel(), TinyModel()
    data = batches(5)
    start = model.table.weight.detach().clone()
    opt = build_optimizer(functools.partial(RowWiseOptimizer, lr=0.02, rows="adam", row_eps=1e-8), model)
    train(model, opt, data)

    # Reference: torch's SparseAdam on the table (sparse=True gradients), torch's Adam on the dense layer.
    sparse_adam = torch.optim.SparseAdam([reference.table.weight], lr=0.02, eps=1e-8)
    adam = torch.optim.Adam(reference.dense.parameters(), lr=0.02)
    for ids, y in data:
        sparse_adam.zero_grad(set_to_none=True)
        adam.zero_grad(set_to_none=True)
        table = reference.table
        emb = nn.functional.embedding(table.flat_ids(ids), table.weight, sparse=True)
        logits = reference.dense(emb.flatten(1)).squeeze(-1)
        nn.functional.binary_cross_entropy_with_logits(logits, y).backward()
        sparse_adam.step()
        adam.step()
    torch.testing.assert_close(model.table.weight, reference.table.weight, rtol=0, atol=1e-7)
    for p, q in zip(model.dense.parameters(), reference.dense.parameters()):
        assert torch.equal(p, q)
    untouched = torch.ones(start.shape[0], dtype=torch.bool)
    untouched[touched_rows(model.table, data)] = False
    assert torch.equal(model.table.weight[untouched], start[untouched])


def test_table_looked_up_twice_sums_both_gradients() -> None:
    """Two lookups before one step give an uncoalesced gradient; the update must use the sum."""
    table = FieldEmbedding([4], 2, init_std=1.0)
    table.row_gradients = True
    start = table.weight.detach().clone()
    opt = RowWiseOptimizer(table.parameters(), lr=0.1, rows="adagrad")
    ids = torch.tensor([[1], [2]])
    (table(ids).sum() + 2 * table(torch.tensor([[1]])).sum()).backward()
    opt.step()
    g = torch.zeros(4, 2)
    g[1], g[2] = 3.0, 1.0  # row 1: 1 + 2, row 2: 1
    expected = start - 0.1 * g / (g.pow(2).mean(1, keepdim=True).sqrt() + 1e-8)
    expected[[0, 3]] = start[[0, 3]]
    torch.testing.assert_close(table.weight.detach(), expected)


def test_state_dict_round_trip_continues_identically() -> None:
    data = batches(6)
    factory = functools.partial(RowWiseOptimizer, lr=0.01, rows="adagrad", row_lr_scale=3.0)
    straight = TinyModel()
    train(straight, build_optimizer(factory, straight), data)

    first = TinyModel()
    opt = build_optimizer(factory, first)
    train(first, opt, data[:3])
    saved_model, saved_opt = copy.deepcopy(first.state_dict()), copy.deepcopy(opt.state_dict())
    resumed = TinyModel()
    resumed.load_state_dict(saved_model)
    opt2 = build_optimizer(factory, resumed)
    opt2.load_state_dict(saved_opt)
    train(resumed, opt2, data[3:])
    for p, q in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_build_optimizer_switches_gradient_kind_both_ways() -> None:
    model = TinyModel()
    rowwise = functools.partial(RowWiseOptimizer, lr=0.01)
    assert updates_rows(rowwise) and not updates_rows(functools.partial(torch.optim.Adam, lr=0.01))
    build_optimizer(rowwise, model)
    assert model.table.row_gradients
    opt = build_optimizer(functools.partial(torch.optim.Adam, lr=0.01), model)
    assert not model.table.row_gradients
    train(model, opt, batches(1))  # torch's Adam refuses sparse gradients: would raise if the switch failed
    assert model.table.weight.grad is not None and not model.table.weight.grad.is_sparse


def test_lookup_without_grad_is_the_plain_gather() -> None:
    table = FieldEmbedding(VOCAB, DIM)
    table.row_gradients = True
    ids = torch.tensor([[0, 1, 2]])
    with torch.no_grad():
        out = table(ids)
    assert out.grad_fn is None and torch.equal(out, table.weight[table.flat_ids(ids)])


def test_dense_gradient_for_a_row_updated_table_is_refused() -> None:
    model = TinyModel()
    opt = build_optimizer(functools.partial(RowWiseOptimizer, lr=0.01), model)
    train(model, opt, batches(1))
    model.table.row_gradients = False
    with pytest.raises(RuntimeError, match="row_gradients"):
        train(model, opt, batches(1))


def test_bad_row_rule_names_the_key() -> None:
    with pytest.raises(ValueError, match="optimizer.rows must be one of"):
        RowWiseOptimizer(TinyModel().parameters(), rows="sgd")
    with pytest.raises(ValueError, match="optimizer.row_lr_scale"):
        RowWiseOptimizer(TinyModel().parameters(), row_lr_scale=0)


def test_optimizer_name_of_each_config() -> None:
    assert optimizer_name({"_target_": "torch.optim.Adam", "lr": 0.001}) == "adam"
    assert optimizer_name({"_target_": "lowrank_ctr.optim.RowWiseOptimizer", "rows": "adagrad"}) == "rowwise_adagrad"
    assert optimizer_name({"_target_": "lowrank_ctr.optim.RowWiseOptimizer", "rows": "adam"}) == "rowwise_adam"
    assert optimizer_name(None) is None
