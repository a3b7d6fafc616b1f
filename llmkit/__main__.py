"""`python -m llmkit`, so `accelerate launch -m llmkit ...` and `torchrun -m llmkit ...` work."""

from llmkit.cli import main

main()
