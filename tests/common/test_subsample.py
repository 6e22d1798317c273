"""Trajectory subsampling: counts, the always-kept last transition, stratification."""
import torch

from nablagfn.common.subsample import num_kept, subsample_steps


def test_keeps_fraction_and_last_step():
    idx = subsample_steps(32, 50, 0.1, low_variance=True, keep_last=True, generator=torch.Generator().manual_seed(0))
    assert idx.shape == (32, 5)
    assert (idx[:, -1] == 49).all()
    assert (idx[:, 1:] > idx[:, :-1]).all()  # sorted, no repeats
    assert idx.min() >= 0


def test_low_variance_covers_every_block():
    idx = subsample_steps(200, 50, 0.1, low_variance=True, keep_last=True, generator=torch.Generator().manual_seed(1))
    # 4 draws over steps 0..48: one per block of width 12.25
    for j in range(4):
        lo, hi = 12.25 * j, 12.25 * (j + 1)
        assert ((idx[:, j] >= int(lo)) & (idx[:, j] < hi)).all()


def test_plain_subsampling_is_without_replacement_and_covers_all_steps():
    idx = subsample_steps(400, 20, 0.25, low_variance=False, keep_last=False, generator=torch.Generator().manual_seed(2))
    assert idx.shape == (400, 5)
    assert (idx[:, 1:] > idx[:, :-1]).all()
    assert set(idx.flatten().tolist()) == set(range(20))


def test_num_kept_edge_cases():
    assert num_kept(50, 0.01, keep_last=False) == 1
    assert num_kept(1, 1.0, keep_last=True) == 1
    assert subsample_steps(3, 1, 1.0).tolist() == [[0], [0], [0]]
