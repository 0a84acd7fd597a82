"""SimCLR v1/v2 in JAX/Flax: models, losses, optimizers, data and training."""

__version__ = "0.1.0"
