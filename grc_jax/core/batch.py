"""Packed rows and training batches: the typed pytrees every layer passes around.

`Rows` are the model's inputs, int32 `[b, t]` (DESIGN.md sections 1-3). `Batch` adds what the
three losses need (see `grc_jax/train/losses.py`). Both are `flax.struct` dataclasses: JAX
transforms map over their fields, and `jax.tree.map` turns a batch into its shapes or shardings.
"""

from __future__ import annotations

import flax.struct
import jax
import numpy as np
from jaxtyping import Float, Int

# Host (numpy, from the data pipeline) or device arrays.
AnyArray = jax.Array | np.ndarray


@flax.struct.dataclass
class Rows:
    """Packed rows, int32 `[b, t]`.

    - `tokens`: vocabulary ids; at `LATENT` slots the latent index `k` in `[0, K)`;
    - `segment_ids`: example within the row, `1, 2, ...`; `0` is padding;
    - `block_ids`: block within the example, `0, 1, ...`;
    - `roles`: `PAD=0, TEXT=1, GEN=2, LATENT=3` (`grc_jax/core/roles.py`);
    - `positions`: RoPE positions (negative in `independent` compression blocks).
    """

    # Leaves travel through JAX transforms as tracers, ShapeDtypeStructs, shardings and specs, so
    # construction is not type-checked; the annotations are the contract.
    __no_type_check__ = True

    tokens: Int[AnyArray, "b t"]
    segment_ids: Int[AnyArray, "b t"]
    block_ids: Int[AnyArray, "b t"]
    roles: Int[AnyArray, "b t"]
    positions: Int[AnyArray, "b t"]

    @property
    def rows(self) -> Rows:
        """The model inputs alone (a `Batch` without its loss fields)."""
        return Rows(self.tokens, self.segment_ids, self.block_ids, self.roles, self.positions)


ROW_FIELDS = ("tokens", "segment_ids", "block_ids", "roles", "positions")


@flax.struct.dataclass(kw_only=True)
class Batch(Rows):
    """Packed rows plus the loss targets, `[B, T]` unless noted:

    - `targets`: the token at `t + 1` (what position `t` predicts);
    - `gen_weights` / `comp_weights`: 1.0 where position `t` predicts a `GEN` token counted for
      `L_gen` / `L_comp` (see `grc_jax/train/losses.py`), 0.0 elsewhere;
    - per example slot, `[B, S]` (`S` = most examples per row): `seg_kind` (`SlotKind`: 0 empty,
      1 query, 2 document), `seg_group` (query id, unique in the global batch; a document carries
      the id of its query), `seg_positive` (1 on a query's positive document), `seg_doc` (hash of
      the document text; on a query, the hash of its positive).
    """

    __no_type_check__ = True

    targets: Int[AnyArray, "b t"]
    gen_weights: Float[AnyArray, "b t"]
    comp_weights: Float[AnyArray, "b t"]
    seg_kind: Int[AnyArray, "b s"]
    seg_group: Int[AnyArray, "b s"]
    seg_positive: Int[AnyArray, "b s"]
    seg_doc: Int[AnyArray, "b s"]
