"""llmkit: a config-driven toolkit for a language model's whole life, from one CLI."""

__version__ = "0.1.0"
