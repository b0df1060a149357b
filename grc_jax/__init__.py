"""grc-jax: GRC (generation, retrieval, compression) in JAX."""

__version__ = "0.1.0"
