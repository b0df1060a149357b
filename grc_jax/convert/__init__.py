"""Import Hugging Face / GGUF checkpoints into grc-jax params."""
