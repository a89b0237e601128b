"""General Preference Models: heads, scoring, training, preference data."""

from gprl.gpm.data import DataError, PreferencePair, load_pairs, write_pairs
from gprl.gpm.model import GeneralPreferenceModel, GPMConfig, GPMOutput, encode_pairs
from gprl.gpm.training import evaluate, pair_scores, preference_loss, train_gpm

__all__ = [
    "DataError",
    "PreferencePair",
    "load_pairs",
    "write_pairs",
    "GeneralPreferenceModel",
    "GPMConfig",
    "GPMOutput",
    "encode_pairs",
    "evaluate",
    "pair_scores",
    "preference_loss",
    "train_gpm",
]
