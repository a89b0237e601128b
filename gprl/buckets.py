"""Length buckets: a micro-batch's rows split into passes of similar response length.

A forward pass is as wide as its longest response, and a padding column costs what a token costs. Splitting the rows
of a micro-batch into a few passes, each as wide as its own longest response, computes fewer padded cells; each
extra pass has a fixed cost (one more launch of every layer, smaller matrices), charged here as one row of the
micro-batch's longest width: a split has to save at least that many cells.
"""

from __future__ import annotations

import torch
from torch import Tensor


def length_buckets(lengths: Tensor, max_buckets: int) -> list[Tensor]:
    """Rows grouped into at most max_buckets runs of the rows sorted by length, longest first, minimising
    Σ_b n_b · w_b + (B − 1) · w_1 (n_b rows of bucket b, w_b its longest length, B buckets, w_1 the longest of all).

    lengths: (n,) ints ≥ 0. Returns index tensors into the rows, in bucket order (longest bucket first)."""
    order = torch.argsort(lengths, descending=True, stable=True)
    if max_buckets <= 1 or len(lengths) <= 1:
        return [order]
    values, counts = torch.unique_consecutive(lengths[order], return_counts=True)  # descending distinct lengths
    d = len(values)
    if d == 1:
        return [order]
    # A bucket covers distinct lengths i..j-1 (i < j): its width is values[i], its rows counts[i:j].
    v, cum = values.double(), torch.cat([counts.new_zeros(1), counts.cumsum(0)]).double()
    # cost[i, j] = values[i] · rows in i..j-1, for i < j; +inf elsewhere
    cost = v[:, None] * (cum[None, 1:] - cum[:-1, None])  # (d, d): row i, column j-1
    cost = torch.where(torch.ones(d, d, dtype=torch.bool).triu(), cost, torch.inf)
    penalty = float(values[0])
    best = cost[0].clone()  # best[j-1]: distinct lengths 0..j-1 in one bucket
    choice = [torch.zeros(d, dtype=torch.long)]  # per bucket count, the start i of the last bucket ending at j-1
    totals = [best[-1].item()]
    for _ in range(1, min(max_buckets, d)):
        # one more bucket i..j-1 after the best split of 0..i-1 (best[i-1])
        prev = torch.cat([torch.full((1,), torch.inf, dtype=best.dtype), best[:-1]])  # prev[i] = best[i-1]
        cand = prev[:, None] + cost + penalty  # (i, j-1)
        best, start = cand.min(dim=0)
        choice.append(start)
        totals.append(best[-1].item())
    k = min(range(len(totals)), key=totals.__getitem__)  # the fewest buckets among equal totals
    bounds, j = [], d
    for b in range(k, -1, -1):
        i = int(choice[b][j - 1]) if b else 0
        bounds.append((i, j))
        j = i
    row_cum = cum.long()
    return [order[int(row_cum[i]) : int(row_cum[j])] for i, j in reversed(bounds)]
