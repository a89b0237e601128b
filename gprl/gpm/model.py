"""General Preference Model heads on any transformers backbone (method.md §1).

A backbone (causal LM or encoder, loaded with AutoModel) reads `prompt + response`.
- embedding head: Linear(hidden, 2k) at the response's last token → v, L2-normalised;
- eigenvalue gate: Linear(hidden, k) at the prompt's last token → λ(x) = total · softmax(z / temperature).
Ours uses total = k and temperature = sqrt(hidden); the GPM authors' published checkpoints use
total = 1 and temperature = 1 (their `value_head` / `prompt_head`), which `from_pretrained` detects.

k = 1 is the Bradley-Terry baseline: the head gives a scalar reward r and v = [r, 1], so
s(i, j) = r_i − r_j (a 2-D unit-vector model could already represent cycles, which BT cannot).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, PretrainedConfig

from gprl.algo.per_axis import pairwise_axis_scores, pairwise_scores
from gprl.buckets import length_buckets
from gprl.prefix import cache_rows, distinct_prompts, run_on_prefix, run_prefix

HEADS_FILE = "gpm_heads.safetensors"
CONFIG_FILE = "gpm_config.json"


@dataclass
class GPMConfig:
    axes: int = 3
    beta: float = 0.1
    gate_total: float | None = None  # Σλ; None = axes
    gate_temperature: float | None = None  # None = sqrt(hidden)
    layout: str = "gprl"  # or "gpm-authors"

    @property
    def bradley_terry(self) -> bool:
        return self.axes == 1


@dataclass
class GPMOutput:
    embeddings: Tensor  # (N, 2k)
    eigenvalues: Tensor  # (N, k)


class GeneralPreferenceModel(nn.Module):
    def __init__(self, backbone: nn.Module, config: GPMConfig):
        super().__init__()
        self.backbone = backbone
        self.config = config
        hidden = backbone.config.hidden_size
        out = 1 if config.bradley_terry else 2 * config.axes
        self.embedding_head = nn.Linear(hidden, out, bias=False)
        self.eigenvalue_gate = nn.Linear(hidden, config.axes, bias=False)
        nn.init.normal_(self.embedding_head.weight, std=1.0 / math.sqrt(hidden))
        nn.init.zeros_(self.eigenvalue_gate.weight)  # λ starts uniform

    # ---- construction and persistence

    @classmethod
    def from_backbone_config(cls, backbone_config: PretrainedConfig, config: GPMConfig) -> "GeneralPreferenceModel":
        return cls(AutoModel.from_config(backbone_config), config)

    @classmethod
    def from_backbone(cls, path: str | os.PathLike, config: GPMConfig) -> "GeneralPreferenceModel":
        """New heads on a pretrained backbone (e.g. the SFT policy) — the usual start of GPM training."""
        return cls(AutoModel.from_pretrained(path), config)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """backbone (config.json + safetensors), heads and GPM config; written to a temp folder then renamed."""
        from gprl.checkpoint import atomic_dir

        with atomic_dir(path) as tmp:
            self.backbone.save_pretrained(tmp)
            save_file(
                {
                    "embedding_head.weight": self.embedding_head.weight.detach().contiguous(),
                    "eigenvalue_gate.weight": self.eigenvalue_gate.weight.detach().contiguous(),
                },
                os.path.join(tmp, HEADS_FILE),
            )
            Path(tmp, CONFIG_FILE).write_text(json.dumps(asdict(self.config), indent=2))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> "GeneralPreferenceModel":
        path = Path(path)
        if (path / CONFIG_FILE).exists():
            cfg = GPMConfig(**json.loads((path / CONFIG_FILE).read_text()))
            model = cls(AutoModel.from_pretrained(path, dtype=dtype), cfg)
            heads = load_file(str(path / HEADS_FILE))
            model.embedding_head.weight.data.copy_(heads["embedding_head.weight"])
            model.eigenvalue_gate.weight.data.copy_(heads["eigenvalue_gate.weight"])
            return model
        return _load_authors_layout(path, dtype)

    # ---- scoring

    def gate(self, prompt_hidden: Tensor) -> Tensor:
        """λ(x) from the hidden state at the last prompt token. (N, hidden) → (N, k)."""
        cfg = self.config
        if cfg.bradley_terry:
            return torch.ones(prompt_hidden.shape[0], 1, dtype=prompt_hidden.dtype, device=prompt_hidden.device)
        total = cfg.axes if cfg.gate_total is None else cfg.gate_total
        temperature = math.sqrt(prompt_hidden.shape[-1]) if cfg.gate_temperature is None else cfg.gate_temperature
        return total * torch.softmax(self.eigenvalue_gate(prompt_hidden) / temperature, dim=-1)

    def embed(self, response_hidden: Tensor) -> Tensor:
        """v from the hidden state at the last response token. (N, hidden) → (N, 2k)."""
        out = self.embedding_head(response_hidden)
        if self.config.bradley_terry:
            return torch.cat([out, torch.ones_like(out)], dim=-1)
        return nn.functional.normalize(out, p=2, dim=-1)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, prompt_last: Tensor, response_last: Tensor) -> GPMOutput:
        """input_ids, attention_mask: (N, L), right-padded prompt+response; prompt_last, response_last: (N,) indices."""
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return GPMOutput(self.embed(hidden[rows, response_last]), self.gate(hidden[rows, prompt_last]))

    @property
    def causal(self) -> bool:
        """Does every attention layer of the backbone look only backwards? Then a prompt's hidden states do not depend
        on its response, and one pass of each prompt can serve all its responses (an encoder's cannot)."""
        flags = [m.is_causal for m in self.backbone.modules() if isinstance(getattr(m, "is_causal", None), bool)]
        return bool(flags) and all(flags)

    def forward_shared(self, input_ids: Tensor, attention_mask: Tensor, prompt_cols: int, response_last: Tensor,
                       max_buckets: int = 1) -> GPMOutput:
        """The same outputs as forward with each distinct prompt run once (gprl.prefix), and the responses in at most
        max_buckets passes of similar length, each as wide as its longest (gprl.buckets). input_ids, attention_mask:
        (N, P + R), prompts left-padded to P columns, then right-padded responses of at least one token;
        response_last: (N,) column of each row's last response token."""
        P = prompt_cols
        first, inverse = distinct_prompts(input_ids[:, :P], attention_mask[:, :P])
        head, cache = run_prefix(self.backbone, input_ids[first, :P], attention_mask[first, :P])
        lengths = (response_last - P + 1).cpu()  # one device sync for the whole split
        response_hidden = head.last_hidden_state.new_empty(input_ids.shape[0], head.last_hidden_state.shape[-1])
        for rows in length_buckets(lengths, max_buckets):
            stop = P + int(lengths[rows].max())
            rows = rows.to(input_ids.device)
            rest = run_on_prefix(self.backbone, input_ids[rows, :stop], attention_mask[rows, :stop], P,
                                 cache_rows(cache, inverse[rows]))
            at = torch.arange(len(rows), device=input_ids.device)
            response_hidden[rows] = rest.last_hidden_state[at, response_last[rows] - P]
        return GPMOutput(self.embed(response_hidden), self.gate(head.last_hidden_state[:, -1])[inverse])

    @torch.no_grad()
    def score(
        self,
        tokenizer,
        prompts: Sequence[str | Sequence[int]],
        responses: Sequence[str | Sequence[int]],
        batch_size: int = 32,
        max_length: int = 1024,
        share_prompt: bool = True,
        max_buckets: int = 4,
    ) -> GPMOutput:
        """Embeddings and eigenvalues of (prompt, response) pairs, batch_size pairs at a time. With a causal
        backbone and `share_prompt`, a pass runs each of its distinct prompts once (a group's G responses share
        theirs), then the responses after them in at most max_buckets passes of similar length (gprl.buckets: a
        padding column costs what a token costs); otherwise each pair's prompt + response."""
        device = next(self.parameters()).device
        share = share_prompt and self.causal
        outs = []
        for start in range(0, len(prompts), batch_size):
            pairs = [pair_tokens(tokenizer, p, r, max_length)
                     for p, r in zip(prompts[start : start + batch_size], responses[start : start + batch_size])]
            if share and all(r for _, r in pairs):
                enc = shared_layout(pairs, _pad_id(tokenizer))
                outs.append(self.forward_shared(enc["input_ids"].to(device), enc["attention_mask"].to(device),
                                                enc["prompt_cols"], enc["response_last"].to(device), max_buckets))
            else:
                outs.append(self(**{k: t.to(device) for k, t in pair_layout(pairs, _pad_id(tokenizer)).items()}))
        return GPMOutput(
            torch.cat([o.embeddings for o in outs]).float(), torch.cat([o.eigenvalues for o in outs]).float()
        )

    def pairwise(self, out: GPMOutput, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
        """Score, probability and per-axis matrices for groups of consecutive responses.

        out holds B·G responses (G per prompt). Returns s (B, G, G), P (B, G, G), S_l (B, k, G, G).
        """
        v = out.embeddings.view(-1, group_size, out.embeddings.shape[-1])
        lam = out.eigenvalues.view(-1, group_size, out.eigenvalues.shape[-1])[:, 0]
        s = pairwise_scores(v, lam)
        return s, torch.sigmoid(s / self.config.beta), pairwise_axis_scores(v, lam)


def _ids(tokenizer, text: str | Sequence[int]) -> list[int]:
    if isinstance(text, str):
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return list(text)


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def pair_tokens(tokenizer, prompt, response, max_length: int = 1024) -> tuple[list[int], list[int]]:
    """The prompt's and the response's (+eos) ids, the prompt left-truncated so the response always fits; an empty
    prompt becomes bos (or pad), an empty response its eos."""
    eos = tokenizer.eos_token_id
    p, r = _ids(tokenizer, prompt), _ids(tokenizer, response)
    if eos is not None and (not r or r[-1] != eos):
        r = r + [eos]
    r = r[: max_length - 1]
    p = p[-(max_length - len(r)) :] if p else []
    if not p:
        p = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else _pad_id(tokenizer)]
    return p, r


def pair_layout(pairs: Sequence[tuple[list[int], list[int]]], pad: int) -> dict[str, Tensor]:
    """Right-padded prompt+response ids with the index of the last prompt and last response token."""
    width = max(len(p) + len(r) for p, r in pairs)
    ids = torch.full((len(pairs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    for i, (p, r) in enumerate(pairs):
        ids[i, : len(p) + len(r)] = torch.tensor(p + r)
        mask[i, : len(p) + len(r)] = 1
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "prompt_last": torch.tensor([len(p) - 1 for p, _ in pairs]),
        "response_last": torch.tensor([len(p) + len(r) - 1 for p, r in pairs]),
    }


def shared_layout(pairs: Sequence[tuple[list[int], list[int]]], pad: int) -> dict:
    """Prompts left-padded to one width P, then right-padded responses (RolloutBatch's layout), with P and the
    column of each row's last response token."""
    P, R = max(len(p) for p, _ in pairs), max(len(r) for _, r in pairs)
    ids = torch.full((len(pairs), P + R), pad, dtype=torch.long)
    mask = torch.zeros((len(pairs), P + R), dtype=torch.long)
    for i, (p, r) in enumerate(pairs):
        ids[i, P - len(p) : P + len(r)] = torch.tensor(p + r)
        mask[i, P - len(p) : P + len(r)] = 1
    return {"input_ids": ids, "attention_mask": mask, "prompt_cols": P,
            "response_last": torch.tensor([P + len(r) - 1 for _, r in pairs])}


def encode_pairs(tokenizer, prompts, responses, max_length: int = 1024) -> dict[str, Tensor]:
    """Right-padded prompt+response(+eos) ids with the index of the last prompt and last response token (pair_tokens
    says how the pair is cut)."""
    return pair_layout([pair_tokens(tokenizer, p, r, max_length) for p, r in zip(prompts, responses)],
                       _pad_id(tokenizer))


def _load_authors_layout(path: Path, dtype: torch.dtype) -> GeneralPreferenceModel:
    """Checkpoints published with the GPM paper: a *ForCausalLM whose base model sits under its
    `base_model_prefix`, plus `value_head.weight` (2k, hidden) and `prompt_head.weight` (k, hidden),
    with λ = softmax(prompt_head(h)) (Σλ = 1, no temperature)."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"{path}: no GPM found (expected {CONFIG_FILE} + {HEADS_FILE}, or *.safetensors with value_head/prompt_head)"
        )
    state: dict[str, Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    if "value_head.weight" not in state or "prompt_head.weight" not in state:
        raise ValueError(
            f"{path}: safetensors hold no `value_head.weight` / `prompt_head.weight`; "
            "not a GPM checkpoint (a scalar reward model or a plain LM?)"
        )
    config = AutoConfig.from_pretrained(path)
    value, prompt = state.pop("value_head.weight"), state.pop("prompt_head.weight")
    axes = value.shape[0] // 2
    if value.shape[0] % 2 or prompt.shape[0] != axes:
        raise ValueError(f"{path}: value_head has {value.shape[0]} rows and prompt_head {prompt.shape[0]}; expected 2k and k")
    backbone = AutoModel.from_config(config, dtype=dtype)
    prefix = backbone.base_model_prefix + "."
    base_state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    missing, _ = backbone.load_state_dict(base_state, strict=False)
    missing = [m for m in missing if "rotary" not in m]
    if missing:
        raise ValueError(f"{path}: backbone weights missing from the checkpoint: {missing[:5]}")
    model = GeneralPreferenceModel(backbone, GPMConfig(axes=axes, gate_total=1.0, gate_temperature=1.0, layout="gpm-authors"))
    model.embedding_head.weight.data.copy_(value)
    model.eigenvalue_gate.weight.data.copy_(prompt)
    return model.to(dtype)
