"""Mean pairwise embedding distance (common/evaluation/diversity.py) on hand-worked examples."""
import math

import pytest
import torch

from nablagfn.common.evaluation import (grouped_mean_pairwise_distance, mean_pairwise_distance,
                                        pairwise_distances)

E = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])


def test_hand_worked_cosine_and_l2():
    # pairs (0,1), (0,2), (1,2): cosine distances 1, 2, 1; L2 distances √2, 2, √2.
    # Tolerance 1e-12: float64 arithmetic on exact unit vectors.
    assert float(mean_pairwise_distance(E, "cosine")) == pytest.approx(4 / 3, abs=1e-12)
    assert float(mean_pairwise_distance(E, "l2")) == pytest.approx((2 * math.sqrt(2) + 2) / 3, abs=1e-12)
    d = pairwise_distances(E, "cosine")
    assert torch.allclose(d, d.T) and torch.all(d.diagonal() == 0)


def test_cosine_ignores_scale_l2_does_not():
    scaled = E * torch.tensor([[2.0], [5.0], [0.5]])
    assert float(mean_pairwise_distance(scaled, "cosine")) == pytest.approx(4 / 3, abs=1e-12)
    assert float(mean_pairwise_distance(scaled, "l2")) != pytest.approx(float(mean_pairwise_distance(E, "l2")))


def test_identical_embeddings_have_zero_diversity_and_zero_vector_counts_as_orthogonal():
    same = torch.ones(4, 3)
    assert float(mean_pairwise_distance(same, "cosine")) == pytest.approx(0, abs=1e-12)
    assert float(mean_pairwise_distance(same, "l2")) == 0
    with_zero = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    assert float(mean_pairwise_distance(with_zero, "cosine")) == pytest.approx(1.0, abs=1e-12)


def test_grouped_is_the_mean_of_per_group_diversities_not_the_pooled_one():
    # group a: E (4/3); group b: two identical vectors (0) -> mean 2/3. Pooled would mix groups.
    emb = torch.cat([E, torch.tensor([[3.0, 3.0], [3.0, 3.0]])])
    groups = ["a", "a", "a", "b", "b"]
    assert float(grouped_mean_pairwise_distance(emb, groups, "cosine")) == pytest.approx(2 / 3, abs=1e-12)
    assert float(mean_pairwise_distance(emb, "cosine")) != pytest.approx(2 / 3, abs=1e-3)
    # group order / interleaving does not matter
    perm = [3, 0, 4, 1, 2]
    assert float(grouped_mean_pairwise_distance(emb[perm], [groups[i] for i in perm], "cosine")) == \
        pytest.approx(2 / 3, abs=1e-12)


@pytest.mark.parametrize("call, match", [
    (lambda: mean_pairwise_distance(torch.ones(1, 3)), "at least 2"),
    (lambda: mean_pairwise_distance(torch.ones(3, 3), "manhattan"), "metric"),
    (lambda: mean_pairwise_distance(torch.full((2, 3), float("nan"))), "NaN"),
    (lambda: grouped_mean_pairwise_distance(torch.ones(3, 2), [0, 0, 1]), "at least 2 samples"),
    (lambda: grouped_mean_pairwise_distance(torch.ones(3, 2), [0, 0]), "labels"),
])
def test_bad_input_is_a_clear_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()
