"""prompt-server: one frozen base model, many hot-swappable soft-prompt adapters."""

__version__ = "0.1.0"
