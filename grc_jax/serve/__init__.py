"""`grc serve`: the OpenAI-compatible server (continuous batching, shared latent memories)."""
