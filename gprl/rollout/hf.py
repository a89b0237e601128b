"""HF transformers generation, in the learner's process (the default backend, runs on CPU)."""

from __future__ import annotations

from typing import Sequence

import torch
from transformers.cache_utils import DynamicLayer

from gprl.config import RolloutSpec
from gprl.prefix import CACHE_ARG, run_prefix
from gprl.rollout.base import RolloutBatch


class HFRollout:
    def __init__(self, model, tokenizer, spec: RolloutSpec, max_prompt_tokens: int = 256, synced_gpus: bool = False,
                 share_prompt: bool = True):
        self.model = model  # shares the learner's weights: nothing to sync
        self.tokenizer = tokenizer
        self.spec = spec
        self.max_prompt_tokens = max_prompt_tokens
        self.share_prompt = share_prompt
        self.version = 0
        # ZeRO-3: every forward gathers parameters collectively, so all ranks must run the same number of decoding
        # steps (transformers keeps stepping finished ranks when this is set).
        self.synced_gpus = synced_gpus

    def sync_weights(self, policy, version: int) -> None:
        self.version = version

    def generate(self, prompts: Sequence[str], group_size: int) -> RolloutBatch:
        tok = self.tokenizer
        side, tok.padding_side = tok.padding_side, "left"
        trunc_side, tok.truncation_side = tok.truncation_side, "left"
        try:
            enc = tok(
                list(prompts),
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=self.max_prompt_tokens,
                add_special_tokens=False,
            )
        finally:
            tok.padding_side, tok.truncation_side = side, trunc_side
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        # Inference mode, not just no_grad: no version counters or view tracking on the hundreds of small ops of each
        # decoding step (5-10 % of a small policy's generation on a CPU; the same kernels, so the same samples).
        # Not under ZeRO-3, whose hooks gather parameters into tensors that must stay usable by autograd. The batch's
        # tensors are built below, outside it: the update's forward saves the token ids for its backward pass.
        ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        with torch.no_grad() if self.synced_gpus else torch.inference_mode():
            rows = {"input_ids": ids, "attention_mask": mask, "num_return_sequences": group_size}
            # not under ZeRO-3 (synced_gpus): the ranks' forwards must match, and a rank whose prompts are one token
            # long would skip the extra pass
            if self.share_prompt and not self.synced_gpus and group_size > 1 and ids.shape[1] > 1:
                rows = self._shared_prefill(ids, mask, group_size)
            out = self.model.generate(
                **rows,
                do_sample=True,
                temperature=self.spec.temperature,
                top_p=self.spec.top_p,
                top_k=self.spec.top_k,
                max_new_tokens=self.spec.max_new_tokens,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
                **({"synced_gpus": True} if self.synced_gpus else {}),
            )
        self.model.train(was_training)
        width = enc["input_ids"].shape[1]
        response = out[:, width:]
        response_mask = _until_eos(response, tok.eos_token_id)
        response = torch.where(response_mask.bool(), response, torch.full_like(response, tok.pad_token_id))
        prompt_mask = mask.repeat_interleave(group_size, dim=0)
        texts = tok.batch_decode(response, skip_special_tokens=True)
        return RolloutBatch(
            prompts=[p for p in prompts for _ in range(group_size)],
            responses=texts,  # as the model wrote them: whitespace is content
            sequences=torch.cat([out[:, :width], response], dim=1),
            attention_mask=torch.cat([prompt_mask, response_mask], dim=1),
            response_mask=response_mask,
            prompt_width=width,
            group_size=group_size,
            policy_version=self.version,
        )

    def _shared_prefill(self, ids: torch.Tensor, mask: torch.Tensor, group_size: int) -> dict:
        """generate's inputs with each prompt but its last token already run once, its cache repeated for the G rows:
        `generate` would run the whole prompt G times in its prefill. The rows are those num_return_sequences makes
        (prompt-major), so the sampler draws the same random numbers; generate runs the last prompt token of every row
        and samples on from there."""
        _, cache = run_prefix(self.model, ids[:, :-1], mask[:, :-1], logits_to_keep=1)
        cache.batch_repeat_interleave(group_size)
        # room for the last prompt token and every new one: decoding then writes its columns in place
        cache.layers = [ReservedLayer.taking_over(layer, 1 + self.spec.max_new_tokens)
                        if type(layer) is DynamicLayer else layer for layer in cache.layers]
        return {"input_ids": ids.repeat_interleave(group_size, dim=0),
                "attention_mask": mask.repeat_interleave(group_size, dim=0), CACHE_ARG: cache}


class ReservedLayer(DynamicLayer):
    """A DynamicLayer that keeps room for `room` more positions: each decoding step writes its key and value columns
    into the room instead of copying the whole cache into a new tensor (DynamicLayer's torch.cat, a copy that grows
    with every token); the keys and values it hands to attention are views of the filled part, the same numbers.
    2-7 % of a 7M-parameter policy's generation on a CPU (benchmarks/step_cuts.py). The room is the size the cache
    reaches when a row runs to max_new_tokens, held from the start (each cat briefly holds two copies instead).
    Generation only: the writes are in place, so no backward pass may run through it. transformers' StaticCache
    reserves room too, but attends over all of it, padding included (slower on a CPU)."""

    def __init__(self, room: int):
        super().__init__()
        self.room = room
        self.buffers: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def taking_over(cls, layer: DynamicLayer, room: int) -> "ReservedLayer":
        """The same cache contents as `layer` (reserved at the next update)."""
        out = cls(room)
        out.__dict__.update(layer.__dict__)  # a DynamicLayer's keys, values and flags; it has no room or buffers
        return out

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, new = self.get_seq_length(), key_states.shape[-2]
        if not self._holds(n + new, key_states):
            self._reserve(n + new + self.room, key_states)
        keys, values = self.buffers
        keys[..., n : n + new, :] = key_states
        values[..., n : n + new, :] = value_states
        self.keys, self.values = keys[..., : n + new, :], values[..., : n + new, :]
        return self.keys, self.values

    def _holds(self, length: int, key_states: torch.Tensor) -> bool:
        """Do the buffers exist, still back self.keys (nothing reassigned it, e.g. a batch_select_indices) and have
        room for `length` positions of rows like key_states?"""
        if self.buffers is None:
            return False
        keys = self.buffers[0]
        backs = self.keys.numel() == 0 or self.keys.data_ptr() == keys.data_ptr() and self.keys.stride() == keys.stride()
        return backs and keys.shape[:2] == key_states.shape[:2] and keys.shape[-2] >= length

    def _reserve(self, capacity: int, key_states: torch.Tensor) -> None:
        n = self.get_seq_length()
        shape = (*key_states.shape[:2], capacity, key_states.shape[-1])
        keys, values = key_states.new_empty(shape), key_states.new_empty(shape)
        if n:
            keys[..., :n, :], values[..., :n, :] = self.keys, self.values
        self.buffers = keys, values


def _until_eos(response: torch.Tensor, eos_id: int | None) -> torch.Tensor:
    """1 on tokens up to and including the first eos; (N, T) ints."""
    if eos_id is None:
        return torch.ones_like(response)
    is_eos = (response == eos_id).int()
    after_eos = (is_eos.cumsum(dim=1) - is_eos) > 0
    return (~after_eos).long()
