"""Soft-prompt adapters: PEFT format parsing, encoder collapse, validation, registry, store."""
