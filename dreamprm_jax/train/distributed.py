"""Multi-host start-up (``jax.distributed``) and per-host data shards.

Every process runs the same program (single program, multiple data). ``initialize`` must be
called before anything touches a device. Process ``i`` of ``n`` then sees all ``n * d``
devices in ``jax.devices()`` (``d`` local), the mesh of :mod:`dreamprm_jax.train.sharding`
spans them all, and each process uploads only the rows of a batch its own devices hold.

Deterministic global order: every process runs the *same* sampler (same seed, same state),
so every process builds the same global batch and uploads only the shards its devices hold
(``sharding.put_batch``). :func:`host_rows` names those rows, read off the batch sharding
itself (``devices_indices_map``), so they always agree with where the shards go.

Environment (flags win over environment variables):

=====================  ===========================  ==========================
argument               environment variable         meaning
=====================  ===========================  ==========================
coordinator_address    ``JAX_COORDINATOR_ADDRESS``  ``host:port`` of process 0
num_processes          ``JAX_NUM_PROCESSES``        number of processes
process_id             ``JAX_PROCESS_ID``           this process, ``0..n-1``
local_device_ids       ``JAX_LOCAL_DEVICE_IDS``     e.g. ``0,1`` (optional)
=====================  ===========================  ==========================

On Cloud TPU / Slurm / Open MPI, ``initialize(auto=True)`` lets JAX detect all of them.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

import jax
import numpy as np

__all__ = ["DistributedConfig", "resolve", "initialize", "is_initialized", "host_rows", "host_slice", "is_primary",
           "barrier", "primary_first", "any_process"]

_initialized = False


class DistributedConfig(dict):
    """``{"coordinator_address", "num_processes", "process_id", "local_device_ids"}``."""


def _env_int(name: str, env) -> int | None:
    value = env.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r}: expected an integer") from None


def resolve(coordinator_address: str | None = None, num_processes: int | None = None,
            process_id: int | None = None, local_device_ids=None, env=None) -> DistributedConfig:
    """Merge flags and environment; validate. ``num_processes`` defaults to 1."""
    env = os.environ if env is None else env
    address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS") or None
    n = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES", env)
    pid = process_id if process_id is not None else _env_int("JAX_PROCESS_ID", env)
    if local_device_ids is None and env.get("JAX_LOCAL_DEVICE_IDS"):
        local_device_ids = [int(s) for s in env["JAX_LOCAL_DEVICE_IDS"].split(",") if s.strip()]
    n = 1 if n is None else int(n)
    if n < 1:
        raise ValueError(f"distributed: num_processes (--num-processes / JAX_NUM_PROCESSES) must be >= 1, got {n}")
    if n > 1:
        if not address:
            raise ValueError("distributed: num_processes > 1 needs a coordinator address "
                             "(--coordinator-address / JAX_COORDINATOR_ADDRESS, host:port of process 0)")
        if pid is None or not 0 <= pid < n:
            raise ValueError(f"distributed: process_id (--process-id / JAX_PROCESS_ID) must be in [0, {n}), got {pid}")
    return DistributedConfig(coordinator_address=address, num_processes=n, process_id=0 if pid is None else pid,
                             local_device_ids=local_device_ids)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids=None, *, auto: bool = False,
               env=None) -> DistributedConfig:
    """``jax.distributed.initialize`` from flags or environment; a no-op for one process.

    Args:
      coordinator_address, num_processes, process_id, local_device_ids: see the module table.
      auto: call ``jax.distributed.initialize()`` without arguments (cluster auto-detection:
        Cloud TPU, Slurm, Open MPI, ...).

    On the CPU backend, cross-process collectives use gloo
    (``jax_cpu_collectives_implementation``), which is switched on here when the platform
    is CPU. Idempotent: a second call returns the resolved config without re-initialising.
    """
    global _initialized
    if auto:
        if not _initialized:
            jax.distributed.initialize()
            _initialized = True
        return DistributedConfig(coordinator_address=None, num_processes=jax.process_count(),
                                 process_id=jax.process_index(), local_device_ids=None)
    cfg = resolve(coordinator_address, num_processes, process_id, local_device_ids, env)
    if cfg["num_processes"] == 1 or _initialized:
        return cfg
    platforms = (os.environ.get("JAX_PLATFORMS") or "").lower()
    if "cpu" in platforms:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=cfg["coordinator_address"], num_processes=cfg["num_processes"],
                               process_id=cfg["process_id"], local_device_ids=cfg["local_device_ids"])
    _initialized = True
    return cfg


def is_initialized() -> bool:
    return _initialized


def is_primary() -> bool:
    """Process 0 (the one that logs, plots and exports)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Every process waits here until all have arrived (a no-op for one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def any_process(flag: bool) -> bool:
    """Whether ``flag`` is true on any process (a collective: every process must call it)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag, np.int32))))


@contextlib.contextmanager
def primary_first(name: str) -> Iterator[None]:
    """Runs the ``with`` body on process 0 first, then on the others.

    For work that writes files other processes read (generated data, a preprocessing cache,
    a tokenizer): on a shared file system the others then find the files ready (and reuse
    them) instead of racing to write them; without one, each process builds its own copy.
    A no-op for one process. If process 0 fails inside the body, the others wait at the
    barrier until the job is torn down.
    """
    multi = jax.process_count() > 1
    if multi and not is_primary():
        barrier(name)
    yield
    if multi and is_primary():
        barrier(name)


def host_rows(sharding: Any, global_shape, axis: int = 0, process_index: int | None = None) -> np.ndarray:
    """Global row indices along ``axis`` that process ``process_index`` (default: this one) holds.

    Read off ``sharding`` itself, so they agree with where ``jax.make_array_from_callback`` puts them.
    For a replicated axis every process holds every row. Sorted ascending (global order).
    """
    pid = jax.process_index() if process_index is None else int(process_index)
    rows: set[int] = set()
    for device, index in sharding.devices_indices_map(tuple(global_shape)).items():
        if device.process_index != pid:
            continue
        sl = index[axis]
        rows.update(range(*sl.indices(int(global_shape[axis]))))
    return np.asarray(sorted(rows), np.int64)


def host_slice(sharding: Any, global_shape, axis: int = 0, process_index: int | None = None) -> slice:
    """:func:`host_rows` as a contiguous ``slice`` (raises if the rows are not contiguous)."""
    rows = host_rows(sharding, global_shape, axis, process_index)
    if rows.size == 0:
        return slice(0, 0)
    if not np.array_equal(rows, np.arange(rows[0], rows[-1] + 1)):
        raise ValueError(f"distributed.host_slice: this process's rows {rows.tolist()} are not contiguous; "
                         "use host_rows")
    return slice(int(rows[0]), int(rows[-1]) + 1)
