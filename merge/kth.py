"""Exact k-th smallest value of a vector that is only ever seen in pieces.

TIES trims each task vector at the k-th smallest |τ| over *all* its tensors flattened together.
Rather than concatenating the vector (N copies of a model), we select on the float32 bit
patterns: map each float to an int32 key whose integer order is the float order, count keys by
their high 16 bits in one pass, then count the low 16 bits inside the one bucket that holds the
k-th key in a second pass. The result is the exact element ``torch.kthvalue`` would return.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Sequence

import torch

_BINS = 1 << 16
if sys.byteorder != "little":  # the int16 views below read the key halves in place
    raise ImportError("clipship.merge.kth assumes a little-endian machine")
_HALF = 1 << 15  # high halves of int32 keys run from -2**15; bins start at 0


def order_keys(x: torch.Tensor) -> torch.Tensor:
    """int32 keys with the same order as the float32 values (-0.0 and 0.0 get one key).

    Non-negative floats order like their bit patterns; for negative ones, flipping the
    magnitude bits reverses their order and keeps them below every non-negative key.
    """
    bits = (x.reshape(-1).to(torch.float32) + 0.0).view(torch.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def key_to_float(key: int) -> float:
    bits = key ^ 0x7FFFFFFF if key < 0 else key
    return float(torch.tensor([bits], dtype=torch.int32).view(torch.float32))


def _locate(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """Bucket holding the k-th (1-based) item and k's rank inside that bucket."""
    below = torch.cumsum(hist, 0)
    bucket = int(torch.searchsorted(below, torch.tensor(k, dtype=below.dtype)))
    before = int(below[bucket - 1]) if bucket else 0
    return bucket, k - before


def kth_smallest_many(
    blocks: Callable[[], Iterable[torch.Tensor]], ks: Sequence[int], nonnegative: bool = False
) -> list[float]:
    """For V vectors at once, the ``ks[i]``-th smallest value (1-based) of vector i.

    ``blocks()`` is called twice and must yield the same [V, m] pieces each time: row i of every
    piece is a part of vector i (parts concatenated in any order make the vector). With
    ``nonnegative``, the caller promises no negative values and no -0.0 (e.g. after ``abs``),
    and the bit patterns are used as keys directly.
    """
    n = len(ks)
    if n == 0:
        return []

    def halves(block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(high, low) 16-bit halves of each key, read in place through an int16 view."""
        block = block.reshape(n, -1)
        if nonnegative and block.dtype == torch.float32:
            keys = block.contiguous().view(torch.int32)
        else:
            keys = order_keys(block).reshape(n, -1)
        pairs = keys.view(torch.int16).reshape(n, -1, 2)  # little-endian: [low, high]
        return pairs[..., 1], pairs[..., 0]

    high = torch.zeros(n, _BINS, dtype=torch.int64)
    for block in blocks():
        top, _ = halves(block)
        for i in range(n):
            row = top[i] if nonnegative else top[i].to(torch.int32) + _HALF
            high[i] += torch.bincount(row, minlength=_BINS)
    totals = high.sum(dim=1).tolist()
    for i, k in enumerate(ks):
        if not 1 <= k <= totals[i]:
            raise ValueError(f"k={k} is out of range for a vector of {totals[i]} values")
    located = [_locate(high[i], k) for i, k in enumerate(ks)]
    offset = 0 if nonnegative else _HALF
    low = torch.zeros(n, _BINS, dtype=torch.int64)
    for block in blocks():
        top, bottom = halves(block)
        for i, (bucket, _) in enumerate(located):
            inside = bottom[i][top[i] == bucket - offset].to(torch.int32) & (_BINS - 1)
            if inside.numel():
                low[i] += torch.bincount(inside, minlength=_BINS)
    out = []
    for i, (bucket, rank) in enumerate(located):
        low_bits, _ = _locate(low[i], rank)
        out.append(key_to_float(((bucket - offset) << 16) | low_bits))
    return out


def kth_smallest(chunks: Callable[[], Iterable[torch.Tensor]], k: int) -> float:
    """The k-th smallest value (1-based) over all pieces: ``torch.kthvalue`` of their concatenation.

    >>> x = torch.tensor([3.0, -1.0, 2.0, 2.0])
    >>> kth_smallest(lambda: [x[:2], x[2:]], 3) == float(torch.kthvalue(x, 3).values)
    True
    """
    return kth_smallest_many(lambda: (piece.reshape(1, -1) for piece in chunks()), [k])[0]
