"""Pallas kernels for grc-jax (hybrid paged attention lands in a later issue)."""
