"""icot: implicit chain-of-thought reasoning via knowledge distillation (Deng et al., 2023)."""

__version__ = "0.1.0"
