"""cpt_bench: compress a causal LM, learn a soft prompt on it, and measure what the prompt recovers."""

__version__ = "0.1.0"
