"""Small exchanges between the processes of a multi-process run (`jax.distributed`).

Each is a collective: every process must call it at the same point, and with one process it
returns at once without touching a device. Values travel as JSON (arbitrary-size integers, small
dicts such as a data-iterator state), not as device numbers, so counters never overflow int32.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from grc_jax.core.errors import OtherProcessError, UserError

# Payloads are padded to a multiple of this many bytes, so that the allgather of a slightly
# longer payload reuses the compiled collective instead of compiling a new one.
_PAD = 256


def gather_json(value: Any) -> list[Any]:
    """Every process's `value` (JSON-serialisable), in process order; `[value]` itself with one
    process."""
    if jax.process_count() == 1:
        return [value]
    data = np.frombuffer(json.dumps(value).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.asarray([data.size], np.int32)))
    sizes = sizes.reshape(-1)
    width = -(-int(sizes.max()) // _PAD) * _PAD
    padded = np.zeros(width, np.uint8)
    padded[: data.size] = data
    rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), width)
    return [json.loads(bytes(rows[i, : int(n)])) for i, n in enumerate(sizes)]


def sum_over_processes(values: Sequence[int]) -> list[int]:
    """The element-wise sums of every process's `values` (integers)."""
    gathered = gather_json([int(v) for v in values])
    return [sum(column) for column in zip(*gathered)]


def raise_together(error: UserError | None) -> None:
    """Stop every process when any of them met a `UserError` (`error`, None if it did not), so
    that none is left waiting in a collective for one that has stopped: the process that met it
    raises it, the others an `OtherProcessError` naming the process and its message."""
    if jax.process_count() == 1:
        if error is not None:
            raise error
        return
    found = gather_json(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    for index, message in enumerate(found):
        if message is not None:
            raise OtherProcessError(
                f"process {index} of {len(found)} stopped (this is process "
                f"{jax.process_index()}): {message}"
            )
