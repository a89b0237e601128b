"""The synthetic world's closed vocabulary and its word classes.

Every text of the world (prompts and responses) is a sequence of these words separated by
single spaces; punctuation marks are words of their own ("the sea is calm ."). That makes
the world tokenizer a plain word-level tokenizer and lets the oracle parse text by
`str.split()`.
"""

from __future__ import annotations

# --- topics: the prompt names one; its words are the "relevant" nouns --------------------
TOPICS: dict[str, tuple[str, ...]] = {
    "ocean": ("ocean", "sea", "wave", "ship", "tide", "shore"),
    "forest": ("forest", "tree", "leaf", "moss", "deer", "branch"),
    "city": ("city", "street", "tower", "bridge", "market", "crowd"),
    "space": ("space", "star", "planet", "moon", "rocket", "orbit"),
    "music": ("music", "song", "drum", "melody", "guitar", "rhythm"),
    "kitchen": ("kitchen", "bread", "soup", "oven", "spice", "knife"),
    "mountain": ("mountain", "peak", "snow", "cliff", "valley", "stone"),
    "garden": ("garden", "flower", "rose", "seed", "soil", "bee"),
}

# --- response words by class ---------------------------------------------------------------
GENERIC_NOUNS = ("thing", "place", "day", "idea", "friend", "story", "world", "moment", "light", "home", "dream", "voice")
DETERMINERS = ("the", "a", "this", "that", "every", "some", "one", "our")
ADJECTIVES = (
    "bright", "calm", "old", "new", "quiet", "warm", "cold", "bold",
    "gentle", "strange", "small", "vast", "green", "dark", "soft", "wild",
)
VERBS = ("is", "holds", "brings", "makes", "finds", "shows", "keeps", "meets", "feels", "sees", "needs", "follows")
ADVERBS = ("very", "quite", "always", "often", "never", "still")
CONJUNCTIONS = ("and", "but")
PERIOD = "."
COMMA = ","
JUNK = ("um", "uh", "xx", "hmm")

# --- styles: a response may open with a style word followed by a comma ----------------------
STYLES: tuple[str, ...] = ("formal", "casual", "poetic")
STYLE_OPENERS: dict[str, tuple[str, ...]] = {
    "formal": ("indeed", "moreover"),
    "casual": ("well", "honestly"),
    "poetic": ("behold", "lo"),
}

# --- prompt-only words -----------------------------------------------------------------------
PROMPT_WORDS = ("please", "write", "describe", "tell", "me", "about", "in", "any", "tone", "words", ":")
LENGTHS = tuple(range(4, 15))  # requested word counts
NUMBER_WORDS = tuple(str(n) for n in LENGTHS)
SEPARATOR = ":"  # last word of every prompt; the response follows it

# --- special tokens --------------------------------------------------------------------------
PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)

TOPIC_OF_WORD: dict[str, str] = {w: t for t, ws in TOPICS.items() for w in ws}
STYLE_OF_OPENER: dict[str, str] = {w: s for s, ws in STYLE_OPENERS.items() for w in ws}

# word classes used by the form (fluency) axis
DET, ADJ, NOUN, VERB, ADV, CONJ, DOT, COM, STY, JNK, OTHER = (
    "DET", "ADJ", "NOUN", "VERB", "ADV", "CONJ", "DOT", "COM", "STY", "JNK", "OTHER",
)


def _word_class() -> dict[str, str]:
    classes: dict[str, str] = {}
    for w in GENERIC_NOUNS:
        classes[w] = NOUN
    for w in TOPIC_OF_WORD:
        classes[w] = NOUN
    classes.update({w: DET for w in DETERMINERS})
    classes.update({w: ADJ for w in ADJECTIVES})
    classes.update({w: VERB for w in VERBS})
    classes.update({w: ADV for w in ADVERBS})
    classes.update({w: CONJ for w in CONJUNCTIONS})
    classes.update({w: STY for w in STYLE_OF_OPENER})
    classes.update({w: JNK for w in JUNK})
    classes[PERIOD] = DOT
    classes[COMMA] = COM
    return classes


WORD_CLASS: dict[str, str] = _word_class()


def all_words() -> list[str]:
    """Every word of the world, specials first, in a fixed order (the tokenizer's ids)."""
    words: list[str] = list(SPECIAL_TOKENS)
    groups = [
        *TOPICS.values(), GENERIC_NOUNS, DETERMINERS, ADJECTIVES, VERBS, ADVERBS, CONJUNCTIONS,
        (PERIOD, COMMA), JUNK, STYLES, *STYLE_OPENERS.values(), PROMPT_WORDS, NUMBER_WORDS,
    ]
    for group in groups:
        for w in group:
            if w not in words:
                words.append(w)
    return words
