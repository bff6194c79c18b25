"""hgf: 1.58-bit (ternary) language models with Hybrid Gated Flow."""

__version__ = "0.1.0"
