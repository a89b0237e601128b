"""The world's word-level tokenizer, built locally (no hub download)."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from . import vocab as V


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A `PreTrainedTokenizerFast` over the closed world vocabulary.

    One token per space-separated word; no special tokens are added when encoding (the policy is
    trained on ``prompt response <eos>``), ``eos`` ends generation, ``pad`` pads (left padding, for
    generation). No chat template: prompts are fed as raw text. `decode` joins words with spaces, so
    decode(encode(text)) == text for every normalised world text.
    """
    words = V.all_words()
    core = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token=V.UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins tokens with single spaces
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=V.BOS,
        eos_token=V.EOS,
        pad_token=V.PAD,
        unk_token=V.UNK,
        padding_side="left",
        model_max_length=256,
    )
    return tok
