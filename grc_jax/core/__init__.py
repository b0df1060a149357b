"""The bottom layer: configuration, token roles and shared constants, error types, sharding rules.

Nothing here imports another `grc_jax` layer (model, data, train, infer, convert, cli).
"""
