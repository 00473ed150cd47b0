"""lightning-tools: fetch, verify, merge, convert, render and publish SDXL-Lightning checkpoints."""

__version__ = "0.1.0"
