"""The shared latent-memory pool on the device: each memory is held once, in one slot, and read
by every request that names it (DESIGN.md section 6).

A slot holds one memory's canonical k / v (`[L, K, G, D]` each) inside the pool arrays
`[L, n_slots + 1, K, G, D]` that decoding reads through per-request memory tables; slot 0 is never
handed out (the filler of unused table entries). Entries are keyed:

- **named** entries (`put(key, memory, named=True)`, the server's `/v1/memories`) stay after their
  last reader leaves; when the pool is full, the least recently used one that no request reads is
  evicted to make room;
- **ephemeral** entries (a `LatentMemory` object handed to `Engine.generate`) live only while some
  request reads them.

Readers count: `acquire(keys)` before a request runs, `release(keys)` when it finishes (or is
cancelled). `delete(key)` of a memory still being read takes the name away at once and frees the
slot when the last reader leaves.
"""

from __future__ import annotations

import collections
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from grc_jax.core.errors import UsageError, UserError
from grc_jax.infer.memory import LatentMemory


class MemoryPoolFullError(UserError, RuntimeError):
    """Every slot of the memory pool holds a memory that some request is reading."""


@dataclasses.dataclass
class _Entry:
    slot: int
    memory: LatentMemory
    named: bool
    readers: int = 0


@functools.partial(jax.jit, donate_argnums=(0,))
def _write_slot(pool: jax.Array, slot: jax.Array, value: jax.Array) -> jax.Array:
    return pool.at[:, slot].set(value.astype(pool.dtype))


class MemoryPool:
    """`n_slots` memory slots of `[n_layers, K, n_kv_heads, head_dim]` keys and values."""

    def __init__(self, n_slots: int, n_layers: int, num_latents: int, n_kv_heads: int,
                 head_dim: int, evicted_names: int = 4096):  # fmt: skip
        if not isinstance(n_slots, int) or n_slots < 1:
            raise UsageError(f"memory pool: expected at least 1 slot, got {n_slots!r}")
        self.n_slots = n_slots
        shape = (n_layers, n_slots + 1, num_latents, n_kv_heads, head_dim)
        self.arrays = {"k": jnp.zeros(shape, jnp.float32), "v": jnp.zeros(shape, jnp.float32)}
        self._free = list(range(n_slots, 0, -1))
        # Least recently used first: a key moves to the end whenever it is put or acquired.
        self._entries: collections.OrderedDict[str, _Entry] = collections.OrderedDict()
        self._evicted: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._evicted_names = evicted_names
        self.evictions = 0

    # ------------------------------------------------------------------ reading the state

    def __contains__(self, key: str) -> bool:
        return key in self._entries and self._entries[key].named

    def get(self, key: str) -> LatentMemory | None:
        """The named memory `key`, or None (never stored, deleted, or evicted)."""
        e = self._entries.get(key)
        return e.memory if e is not None and e.named else None

    def was_evicted(self, key: str) -> bool:
        return key in self._evicted

    def slot(self, key: str) -> int:
        return self._entries[key].slot

    @property
    def free_slots(self) -> int:
        return len(self._free)

    @property
    def held(self) -> int:
        """Slots holding a memory (named or being read)."""
        return self.n_slots - len(self._free)

    @property
    def named(self) -> int:
        return sum(e.named for e in self._entries.values())

    @property
    def read(self) -> int:
        """Slots some request is reading now."""
        return sum(e.readers > 0 for e in self._entries.values())

    # ------------------------------------------------------------------ changing it

    def put(self, key: str, memory: LatentMemory, named: bool) -> int:
        """Store `memory` under `key` (a no-op if the key is there: the memory is held once) and
        return its slot. A full pool evicts its least recently used unread named memory first."""
        e = self._entries.get(key)
        if e is not None:
            e.named = e.named or named
            self._entries.move_to_end(key)
            return e.slot
        if not self._free:
            self._evict_one()
        slot = self._free.pop()
        at = jnp.int32(slot)
        self.arrays = {
            "k": _write_slot(self.arrays["k"], at, jnp.asarray(memory.k)),
            "v": _write_slot(self.arrays["v"], at, jnp.asarray(memory.v)),
        }
        self._entries[key] = _Entry(slot, memory, named)
        self._evicted.pop(key, None)
        return slot

    def _evict_one(self) -> None:
        for key, e in self._entries.items():
            if e.readers == 0:
                self._drop(key)
                self.evictions += 1
                self._evicted[key] = None
                while len(self._evicted) > self._evicted_names:
                    self._evicted.popitem(last=False)
                return
        raise MemoryPoolFullError(
            f"memory pool full: all {self.n_slots} slots hold memories that running requests "
            "read (raise --memory-slots, or retry when requests finish)"
        )

    def _drop(self, key: str) -> None:
        e = self._entries.pop(key)
        self._free.append(e.slot)

    def acquire(self, keys: list[str]) -> list[int]:
        """Count one more reader of each key (all must be stored); their slots, in order."""
        missing = [k for k in keys if k not in self._entries]
        if missing:
            raise KeyError(missing[0])
        slots = []
        for k in keys:
            e = self._entries[k]
            e.readers += 1
            self._entries.move_to_end(k)
            slots.append(e.slot)
        return slots

    def release(self, keys: list[str]) -> None:
        """One reader fewer of each key; an unnamed entry nobody reads is freed."""
        for k in keys:
            e = self._entries[k]
            if e.readers <= 0:
                raise ValueError(f"memory {k!r} released more often than acquired")
            e.readers -= 1
            if e.readers == 0 and not e.named:
                self._drop(k)

    def delete(self, key: str) -> bool:
        """Forget the named memory `key` (its slot is freed now, or when its last reader leaves);
        False if no such named memory."""
        e = self._entries.get(key)
        if e is None or not e.named:
            return False
        e.named = False
        if e.readers == 0:
            self._drop(key)
        return True

    def fill_free_slots(self, value: float) -> None:
        """Overwrite every free slot (and slot 0) with `value`: a test of memory hygiene (NaN
        in a slot no request reads must not change any output)."""
        free = np.asarray([0, *self._free])
        self.arrays = {k: a.at[:, free].set(value) for k, a in self.arrays.items()}
