"""GPRL: General Preference Reinforcement Learning."""

__version__ = "0.1.0"
