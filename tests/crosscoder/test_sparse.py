"""The sparse training path equals a dense reference implementation of the same step."""

import pytest
import torch

from mneme_plugin.crosscoder import CrossCoderConfig, sparse
from mneme_plugin.crosscoder.model import BatchTopKCrossCoder
from mneme_plugin.crosscoder.sparse import batch_topk_indices


def _dense_reference_loss(model: BatchTopKCrossCoder, x_norm: torch.Tensor) -> torch.Tensor:
    batch = x_norm.shape[0]
    pre = torch.relu(x_norm.reshape(batch, -1) @ model.W_enc.reshape(-1, model.dict_size) + model.b_enc)
    salience = (pre * model.salience_weights()).detach()
    mask = torch.zeros(salience.numel(), dtype=pre.dtype)
    mask[salience.reshape(-1).topk(model.k * batch).indices] = 1
    f = pre * mask.reshape(salience.shape)
    x_hat = torch.einsum("bm,lmd->bld", f, model.W_dec) + model.b_dec
    return (x_norm - x_hat).pow(2).sum()


@pytest.mark.parametrize("kernel", sparse.SPARSE_KERNELS)
def test_sparse_step_matches_dense_autograd(kernel, monkeypatch):
    # Each kernel (embedding_bag: the CPU default; csr: the CUDA default) on this machine.
    monkeypatch.setattr(sparse, "_kernel_for", lambda table, chosen: kernel)
    torch.manual_seed(0)
    for salience in ("paper", "crosscoder", "sae"):
        model = BatchTopKCrossCoder(
            CrossCoderConfig(activation_dim=12, dict_size=48, k=3, salience=salience, dtype="float64")
        )
        with torch.no_grad():
            model.b_enc.normal_(0, 0.1)
            model.b_dec.normal_(0, 0.1)
        x_norm = model.normalize(torch.randn(40, 2, 12, dtype=torch.float64))

        active, _, _ = model.batch_topk_active(x_norm)
        sparse_loss = (x_norm - model.decode_active(active)).pow(2).sum()
        sparse_loss.backward()
        sparse_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()

        dense_loss = _dense_reference_loss(model, x_norm)
        dense_loss.backward()
        torch.testing.assert_close(sparse_loss, dense_loss, rtol=1e-12, atol=1e-12)
        for name, param in model.named_parameters():
            torch.testing.assert_close(sparse_grads[name], param.grad, rtol=1e-10, atol=1e-12, msg=name)


def test_bag_sums_equal_a_brute_force_sum_with_empty_bags():
    generator = torch.Generator().manual_seed(3)
    rows = torch.tensor([0, 0, 2, 2, 2, 5])  # bags 1, 3 and 4 empty
    latents = torch.randint(0, 7, (6,), generator=generator)
    weights = torch.randn(6, generator=generator)
    table = torch.randn(7, 5, generator=generator)
    starts = torch.searchsorted(rows, torch.arange(6))
    expected = torch.zeros(6, 5).index_add_(0, rows, weights[:, None] * table[latents])
    for kernel in sparse.SPARSE_KERNELS:
        got = sparse._sum_latents_by_row(latents, starts, table, weights, kernel=kernel)
        torch.testing.assert_close(got, expected, msg=kernel)
    with pytest.raises(ValueError, match="Unknown sparse kernel 'dense': use one of"):
        sparse._sum_latents_by_row(latents, starts, table, weights, kernel="dense")


def test_batch_topk_indices_equals_full_topk():
    gen = torch.Generator().manual_seed(1)
    for shape, keep in [((512, 4096), 16 * 512), ((64, 300), 7 * 64), ((2048, 1024), 2048 * 4)]:
        salience = torch.relu(torch.randn(*shape, generator=gen))
        fast = set(batch_topk_indices(salience, keep).tolist())
        reference = set(salience.reshape(-1).topk(keep).indices.tolist())
        assert fast == reference


@pytest.mark.parametrize("n", [1 << 16, (1 << 16) + 5, 1_000_003])
@pytest.mark.parametrize("share", [0.0, 0.0005, 0.02, 0.5, 1.0])
def test_the_word_wise_nonzero_equals_torch_nonzero(n, share):
    """BatchTopK's candidate scan reads the mask 8 bytes at a time on CPU; every index, in order, as
    torch's nonzero gives it, for lengths that are no multiple of 8 and views that start mid-word."""
    from mneme_plugin.crosscoder.sparse import _flat_nonzero

    mask = torch.rand(n + 3, generator=torch.Generator().manual_seed(n)) < share
    for view in (mask[:n], mask[3:], mask[1::2]):
        assert torch.equal(_flat_nonzero(view), view.nonzero().squeeze(1))


def test_batch_topk_indices_when_few_entries_are_positive():
    salience = torch.zeros(1024, 256)
    salience[3, 5] = 2.0
    salience[900, 17] = 1.0
    idx = batch_topk_indices(salience, 4 * 1024)
    assert idx.numel() == 4 * 1024
    assert {3 * 256 + 5, 900 * 256 + 17} <= set(idx.tolist())


def test_sparse_step_leaves_the_thread_count_as_it_found_it():
    # The index sorts run on one thread (sparse._sorted_indices); the caller's setting must come back.
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model = BatchTopKCrossCoder(CrossCoderConfig(activation_dim=8, dict_size=32, k=2))
        x_norm = model.normalize(torch.randn(16, 2, 8))
        active, _, _ = model.batch_topk_active(x_norm)
        (x_norm - model.decode_active(active)).pow(2).sum().backward()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def _lowest_index_reference(salience: torch.Tensor, keep: int) -> list[int]:
    """The ``keep`` largest entries, ties at the cut-off to the lowest flat indices: a stable sort."""
    order = torch.sort(-salience.reshape(-1).double(), stable=True).indices
    return sorted(order[:keep].tolist())


@pytest.mark.parametrize("shape, keep", [((64, 300), 7 * 64), ((512, 4096), 16 * 512)])  # full topk; sampled
def test_batch_topk_breaks_ties_at_the_cut_off_by_the_lowest_flat_index(shape, keep):
    """bf16 saliences tie often at the cut-off; which tied entries are kept must not be topk's arbitrary choice
    (one process and the ranks of a data-parallel job would differ)."""
    gen = torch.Generator().manual_seed(2)
    salience = torch.relu(torch.randn(*shape, generator=gen)).to(torch.bfloat16)  # 8-bit mantissa: many ties
    flat = salience.reshape(-1)
    ordered = flat.float().sort(descending=True).values
    while ordered[keep - 1] != ordered[keep]:  # the budget moved to the first tie at its cut-off
        keep += 1
    assert int((flat >= ordered[keep - 1]).sum()) > keep, "no tie to break at the cut-off"
    kept = batch_topk_indices(salience, keep).tolist()
    assert sorted(kept) == _lowest_index_reference(salience, keep)
    assert kept == sorted(kept)  # ascending, as documented
    # Planted: every entry equal, the budget a part of them: the first `keep` in row-major order.
    equal = torch.full(shape, 0.5)
    assert sorted(batch_topk_indices(equal, keep).tolist()) == list(range(keep))


def test_the_encoder_gradient_of_a_row_major_matrix_equals_dense_autograd():
    """gather_active also takes an (in_dim, m) row-major encoder (the crosscoder passes a latent-major view)."""
    torch.manual_seed(0)
    x = torch.randn(30, 10, dtype=torch.float64)
    W = torch.randn(10, 24, dtype=torch.float64, requires_grad=True)
    b = torch.randn(24, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(24, dtype=torch.float64) + 0.5
    with torch.no_grad():
        salience = torch.relu(x @ W + b) * weights
    active = sparse.gather_active(W, b, x, salience, weights, batch_topk_indices(salience, 60))
    (active.values * torch.arange(active.values.numel(), dtype=torch.float64)).sum().backward()
    sparse_grads = W.grad.clone(), b.grad.clone()
    W.grad, b.grad = None, None
    pre = torch.relu(x @ W + b)
    (pre.reshape(-1)[active.rows * 24 + active.latents] * torch.arange(active.values.numel(), dtype=torch.float64)).sum().backward()
    torch.testing.assert_close(sparse_grads[0], W.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sparse_grads[1], b.grad, rtol=1e-12, atol=1e-12)
    assert sparse_grads[0].is_contiguous()
