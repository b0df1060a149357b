"""Start-up of multi-process JAX (`jax.distributed`) for `grc train`.

`initialize` must run before anything touches a JAX device: it decides whether this process is one
of several and, if so, joins them. The sources, first match wins:

1. explicit flags (`--coordinator HOST:PORT --num-processes N --process-id I`);
2. the environment (`JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`);
3. a Cloud TPU VM (libtpu installed and TPU chips visible) or a GKE TPU pod
   (`TPU_WORKER_HOSTNAMES`): `jax.distributed.initialize()` with no arguments, which reads the
   slice's workers from the TPU metadata;
4. otherwise a single process, and nothing is done.

On CPU, cross-process collectives go through gloo (TCP), which is what the two-process test uses.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import os
from collections.abc import Mapping

from grc_jax.core.errors import ConfigError


class DistributedConfigError(ConfigError):
    """The distributed flags/environment are incomplete or inconsistent."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """How this process starts: `mode` is "single", "explicit" or "tpu" (auto-detected)."""

    mode: str
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    source: str = ""


def _int(value: str | int | None, name: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise DistributedConfigError(f"{name} must be an integer, got {value!r}") from None


_GOOGLE_PCI_VENDOR = "0x1ae0"  # TPU chips on the PCI bus, as JAX's own TPU detection reads them


def on_tpu_vm(environ: Mapping[str, str] = os.environ, sysfs: str = "/sys/bus/pci/devices") -> bool:
    """A TPU host: GKE's worker list, or libtpu installed with TPU chips on the PCI bus. Checked
    without starting JAX, and without querying the TPU metadata server (absent off Google Cloud)."""
    if environ.get("TPU_WORKER_HOSTNAMES"):
        return True
    if importlib.util.find_spec("libtpu") is None:
        return False
    for vendor in glob.glob(os.path.join(sysfs, "*", "vendor")):
        try:
            if open(vendor).read().strip() == _GOOGLE_PCI_VENDOR:
                return True
        except OSError:
            continue
    return False


def plan(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    enabled: bool = True,
    environ: Mapping[str, str] = os.environ,
) -> Plan:
    """Decide how to start (see the module docstring); pure, so it is unit-testable."""
    if not enabled:
        return Plan("single", source="--no-distributed")
    given = {"--coordinator": coordinator, "--num-processes": num_processes,
             "--process-id": process_id}  # fmt: skip
    if any(v is not None for v in given.values()):
        source = "flags"
    else:
        coordinator = environ.get("JAX_COORDINATOR_ADDRESS") or None
        num_processes = _int(environ.get("JAX_NUM_PROCESSES"), "JAX_NUM_PROCESSES")
        process_id = _int(environ.get("JAX_PROCESS_ID"), "JAX_PROCESS_ID")
        given = {"JAX_COORDINATOR_ADDRESS": coordinator, "JAX_NUM_PROCESSES": num_processes,
                 "JAX_PROCESS_ID": process_id}  # fmt: skip
        source = "environment"
    if all(v is None for v in given.values()):
        if on_tpu_vm(environ):
            return Plan("tpu", source="TPU VM auto-detection")
        return Plan("single", source="no coordinator given")
    missing = [k for k, v in given.items() if v is None]
    if missing:
        raise DistributedConfigError(
            f"multi-process start from {source} needs all of {', '.join(given)}; "
            f"missing {', '.join(missing)}"
        )
    assert coordinator is not None and num_processes is not None and process_id is not None
    if ":" not in coordinator:
        raise DistributedConfigError(f"coordinator must be HOST:PORT, got {coordinator!r}")
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise DistributedConfigError(
            f"need num_processes >= 1 and 0 <= process_id < num_processes, "
            f"got num_processes={num_processes}, process_id={process_id}"
        )
    if num_processes == 1:
        return Plan("single", source=f"{source}: one process")
    return Plan("explicit", coordinator, num_processes, process_id, source)


_started: Plan | None = None


def initialize(p: Plan, timeout_s: int = 300) -> Plan:
    """Join the other processes as `p` says (idempotent; a no-op for a single process).

    Call before any JAX device is used: `jax.distributed.initialize` refuses to run after that.
    """
    global _started
    if _started is not None or p.mode == "single":
        _started = _started or p
        return _started
    import jax

    if p.mode == "explicit":
        # CPU collectives across processes (no-op for TPU/GPU computations, which use ICI/NCCL).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=p.coordinator,
            num_processes=p.num_processes,
            process_id=p.process_id,
            initialization_timeout=timeout_s,
        )
    else:
        jax.distributed.initialize(initialization_timeout=timeout_s)
    _started = p
    return p


def describe() -> str:
    """One line for the log: which process of how many, and the devices it sees."""
    import jax

    return (
        f"process {jax.process_index()}/{jax.process_count()}: "
        f"{jax.local_device_count()} local of {jax.device_count()} {jax.default_backend()} devices"
    )
