"""Shared prompt prefixes: each distinct prompt of a batch runs once, and its keys and values serve every row.

A group's G responses share their prompt, so the reference, policy and GPM passes need not run it G times. With
a causal model the response columns attend to the same prompt keys and values either way: the outputs are the
same up to float rounding, and a backward pass sums the rows' gradients into the one prompt pass (as it sums them
over G copies without sharing). Rows are left-padded prompts then right-padded continuations (RolloutBatch's
layout); positions count the unpadded tokens, as in generation.
"""

from __future__ import annotations

import copy

import torch
import transformers
from packaging.version import Version
from torch import Tensor

# transformers 5.24 names the forward's cache argument `cache` (`past_key_values` still works there, with a warning);
# the vLLM venv's 5.19 and the 4.x series know only `past_key_values`
CACHE_ARG = "cache" if Version(transformers.__version__) >= Version("5.24") else "past_key_values"


def distinct_prompts(ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """The rows' distinct prompts: the first row holding each, and the index of each row's. ids, mask: (n, P) →
    (u,), (n,), ids[first][inverse] == ids where mask is 1."""
    key = torch.where(mask.bool(), ids, -1)  # padding compares equal whatever id it holds
    _, inverse = torch.unique(key, dim=0, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), ids.shape[0], dtype=torch.long, device=ids.device)
    first.scatter_reduce_(0, inverse, torch.arange(ids.shape[0], device=ids.device), reduce="amin")
    return first, inverse


def positions_of(mask: Tensor) -> Tensor:
    """Position ids of left-padded rows: 0 at each row's first token. (n, L) → (n, L)."""
    return (mask.cumsum(dim=1) - 1).clamp_min(0)


def run_prefix(model, ids: Tensor, mask: Tensor, **kwargs):
    """One cached pass over left-padded rows: (the model's output, its KV cache) — the cache is `cache` on
    transformers 5.24's outputs, `past_key_values` before."""
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions_of(mask), use_cache=True, **kwargs)
    cache = getattr(out, "cache", None)
    return out, cache if cache is not None else out.past_key_values


def cache_rows(cache, index: Tensor):
    """A KV cache holding rows `index` of `cache`, which is left as it is (passes on several subsets of the rows
    each extend their own copy). The layers' tensors are indexed, not copied in place: a backward pass through the
    copy sums into the pass that filled the source."""
    out = copy.copy(cache)
    out.layers = [copy.copy(layer) for layer in cache.layers]
    out.batch_select_indices(index)
    return out


def run_on_prefix(model, ids: Tensor, mask: Tensor, prefix_cols: int, cache, **kwargs):
    """Columns prefix_cols: of rows whose first prefix_cols columns are in `cache` (one cache row per row). ids, mask:
    (n, L); the mask covers the prefix too."""
    return model(input_ids=ids[:, prefix_cols:], attention_mask=mask, position_ids=positions_of(mask)[:, prefix_cols:],
                 use_cache=True, **{CACHE_ARG: cache}, **kwargs)
