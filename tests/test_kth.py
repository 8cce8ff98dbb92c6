"""The streaming k-th value equals torch.kthvalue on the concatenated vector, exactly."""

import pytest
import torch

from clipship.merge.kth import kth_smallest, kth_smallest_many, order_keys


def tricky_vector(g: torch.Generator, n: int) -> torch.Tensor:
    """Random values with many ties, +0.0, -0.0, tiny and huge magnitudes."""
    x = torch.randn(n, generator=g) * 10 ** float(torch.randint(-8, 4, (1,), generator=g))
    u = torch.rand(n, generator=g)
    x = torch.where(u < 0.15, torch.zeros(n), x)
    x = torch.where((u >= 0.15) & (u < 0.25), -torch.zeros(n), x)
    x = torch.where((u >= 0.25) & (u < 0.45), x.round(), x)  # ties
    x = torch.where(u > 0.98, torch.tensor(float("inf")) * torch.sign(x), x)
    return x


@pytest.mark.parametrize("seed", range(20))
def test_matches_kthvalue_with_ties_zeros_and_negative_zeros(seed):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 20_000, (1,), generator=g))
    x = tricky_vector(g, n)
    pieces = list(torch.split(x, max(1, n // 13)))
    for k in {1, n, int(torch.randint(1, n + 1, (1,), generator=g)), (n + 1) // 2}:
        assert kth_smallest(lambda: pieces, k) == float(torch.kthvalue(x, k).values)


def test_many_vectors_at_once_and_nonnegative_fast_path():
    g = torch.Generator().manual_seed(1)
    m = torch.stack([tricky_vector(g, 5000) for _ in range(3)]).abs()
    ks = [1, 2500, 5000]
    expected = [float(torch.kthvalue(m[i], k).values) for i, k in enumerate(ks)]
    blocks = list(torch.split(m, 333, dim=1))
    assert kth_smallest_many(lambda: blocks, ks, nonnegative=True) == expected
    assert kth_smallest_many(lambda: blocks, ks) == expected


def test_keys_preserve_float_order():
    values = torch.tensor(
        [float("-inf"), -3e38, -1.0, -1e-45, -0.0, 0.0, 1e-45, 1.0, 3e38, float("inf")]
    )
    keys = order_keys(values).tolist()
    assert keys == sorted(keys)
    assert keys[4] == keys[5]  # -0.0 == 0.0


def test_k_out_of_range_is_an_error():
    with pytest.raises(ValueError, match="out of range"):
        kth_smallest(lambda: [torch.ones(3)], 4)
