"""Device mesh and sharding rules for the bi-level iteration (GSPMD through ``jax.jit``).

One set of rules serves the trainer and ``benchmarks.memory``. The model and the bi-level
engine contain no device code: shardings are applied at the jit boundary
(``in_shardings`` / ``out_shardings``) and, for the state the unroll carries from step to
step, by an optimizer wrapper (:func:`constrain_optimizer`) whose ``update`` pins the
gradient, the update and the new optimizer state to the same rule as the parameters. XLA's
SPMD partitioner inserts the collectives; numbers equal the single-device run up to float
reassociation of the reductions.

Mesh: two named axes ``("data", "fsdp")`` with sizes from ``--mesh data=2,fsdp=4`` (default:
every device on ``fsdp``).

Rules
-----
* **Parameters, gradients, both inner optimizer moments, the unroll's carry**: each leaf of
  shape ``s`` is sharded over ``fsdp`` on its largest dimension ``d`` with
  ``s[d] % fsdp == 0`` (ties: the later dimension, i.e. the output side of an ``[in, out]``
  kernel); a leaf with no such dimension (scalars, step counts, small biases) is
  replicated. Parameters are replicated over ``data`` (hybrid sharded data parallelism).
* **Domain weights** ``raw_weights [K]``, their meta optimizer state and the step counter:
  replicated. So is an instance-weight table ``raw_weights [N]`` (one float32 per training
  record: 100,000 records are 400 KB, and a replicated table is gathered per batch row with
  no communication) or the Instance Net's parameters.
* **Batches**: the batch axis is sharded over ``("data", "fsdp")`` (every device holds
  ``B / (data * fsdp)`` rows); if ``B`` is not divisible by ``data * fsdp`` then over
  ``data`` alone if divisible, else replicated. Each field of the typed batches
  (``data.types.TrainBatch`` / ``MetaBatch`` and their ``ModelInputs``) names its row axis
  (``row_axis``): axis 0 of ``input_ids / attention_mask [B, L]`` and of ``labels /
  domain_ids / sample_mask [B]``, axis 1 of ``position_ids [3, B, L]``, and the chains of the
  meta batch's ``step_mask [M, S]``, ``labels / chain_mask [M]``. Inner batches stacked
  ``[T, B, ...]`` shift every batch axis by one (``position_ids [T, 3, B, L]`` on axis 2).
* **Image patches** ``pixel_values [N, D]``, ``vision_position_ids [N, 2]``,
  ``vision_segment_ids [N]``: replicated by default. Their rows are *global* to the batch:
  ``prepare_batch`` concatenates the patches of all images of the batch in batch order,
  pads at the end only, numbers the frames ``0..n-1`` over the whole batch, and the model
  fills the ``<|image_pad|>`` positions of ``input_ids`` in row-major order by a cumulative
  count over the whole ``[B, L]`` (``rank = cumsum(is_image) - 1``). Under a single
  controller any sharding of these rows is still correct (GSPMD keeps the semantics of the
  global array); ``shard_patches=True`` shards the rows over ``("data", "fsdp")`` when
  ``N`` is divisible. What is *not* correct is to build the patch rows per host from the
  host's own samples and concatenate them: the padding would sit between hosts' images,
  breaking the rank -> feature-row mapping, and the frame ids would collide. So in a
  multi-host run every host builds the global batch and uploads only the shards its devices
  hold (:func:`put`).

Example (what the training loop does)::

    mesh = make_mesh("data=2,fsdp=4")
    optimizer = constrain_optimizer(step_lib.inner_optimizer(...), mesh)   # pins the carry
    state = sharded_init(lambda p: step_lib.init_state(p, K, optimizer, meta_opt), mesh, params)
    bilevel_step = ShardedStep(step_lib.make_bilevel_step(cfg, optimizer, meta_opt, ...), mesh)
    state, metrics = bilevel_step(state, inner_batches, meta_batch)   # host numpy batches in
    host_params = to_host(state["params"], mesh)                       # e.g. for the export
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dreamprm_jax.bilevel.inner import ReversibleAdamW
from dreamprm_jax.models.qwen2_vl.inputs import PATCH_ROWS, row_axis

__all__ = [
    "AXES",
    "parse_mesh_spec",
    "make_mesh",
    "leaf_spec",
    "tree_shardings",
    "state_shardings",
    "batch_spec",
    "batch_shardings",
    "constrain",
    "constrain_optimizer",
    "shard_bilevel_step",
    "ShardedStep",
    "sharded_init",
    "shard_tree",
    "to_host",
    "put",
    "put_batch",
    "replicated",
]

AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")
#: Leaves of the training state that are replicated (the upper level and the counter).
REPLICATED_STATE_KEYS = ("raw_weights", "meta_opt_state", "step")


# ---------------------------------------------------------------------------------- mesh

def parse_mesh_spec(spec: str | None, num_devices: int) -> dict[str, int]:
    """``"data=2,fsdp=4"`` -> ``{"data": 2, "fsdp": 4}``.

    ``None`` / ``""`` puts every device on ``fsdp``. One size may be ``-1`` (or omitted) and
    is then inferred from ``num_devices``. The product must not exceed ``num_devices`` (a
    smaller mesh uses the first ``data * fsdp`` devices).
    """
    sizes: dict[str, int] = {}
    if spec:
        for part in spec.split(","):
            part = part.strip()
            if not part:
                continue
            if "=" not in part:
                raise ValueError(f"--mesh {spec!r}: expected comma-separated name=size pairs, e.g. 'data=2,fsdp=4'; "
                                 f"got {part!r}")
            name, value = (s.strip() for s in part.split("=", 1))
            if name not in AXES:
                raise ValueError(f"--mesh {spec!r}: unknown axis {name!r}; expected one of {AXES}")
            if name in sizes:
                raise ValueError(f"--mesh {spec!r}: axis {name!r} given twice")
            try:
                sizes[name] = int(value)
            except ValueError:
                raise ValueError(f"--mesh {spec!r}: size of {name!r} must be an integer, got {value!r}") from None
    for name in AXES:
        sizes.setdefault(name, -1)
    unknown = [n for n in AXES if sizes[n] == -1]
    known = math.prod(sizes[n] for n in AXES if sizes[n] != -1)
    if any(sizes[n] == 0 or sizes[n] < -1 for n in AXES):
        raise ValueError(f"--mesh {spec!r}: axis sizes must be positive, got {sizes}")
    if len(unknown) == 2:
        sizes["data"], unknown = 1, ["fsdp"]
    if unknown:
        if num_devices % known:
            raise ValueError(f"--mesh {spec!r}: {known} does not divide the {num_devices} devices")
        sizes[unknown[0]] = num_devices // known
    if math.prod(sizes.values()) > num_devices:
        raise ValueError(f"--mesh {spec!r}: data*fsdp = {sizes['data']}*{sizes['fsdp']} > {num_devices} devices")
    return sizes


def make_mesh(spec: str | Mapping[str, int] | None = None, devices=None) -> Mesh:
    """A :class:`jax.sharding.Mesh` with axes ``("data", "fsdp")``.

    Args:
      spec: ``"data=2,fsdp=4"``, a mapping, or ``None`` (all devices on ``fsdp``).
      devices: devices to use (default ``jax.devices()``, every process's devices in a
        multi-host run, ordered so each process holds a contiguous block of the mesh).
    """
    devices = list(jax.devices() if devices is None else devices)
    if isinstance(spec, Mapping):
        spec = ",".join(f"{k}={v}" for k, v in spec.items())
    sizes = parse_mesh_spec(spec, len(devices))
    shape = tuple(sizes[n] for n in AXES)
    devices = devices[:math.prod(shape)]
    try:
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # noqa: BLE001 - unusual topologies: plain process-major order
        grid = np.array(sorted(devices, key=lambda d: (d.process_index, d.id))).reshape(shape)
    return Mesh(grid, AXES)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


# ------------------------------------------------------------------------- state rules

def leaf_spec(shape, axis_size: int, axis_name: str = "fsdp") -> P:
    """``P`` sharding the largest dimension divisible by ``axis_size`` (ties: the later one)."""
    shape = tuple(int(s) for s in shape)
    if axis_size <= 1 or not shape:
        return P()
    best = None
    for d, s in enumerate(shape):
        if s % axis_size == 0 and s >= axis_size and (best is None or s >= shape[best]):
            best = d
    if best is None:
        return P()
    spec = [None] * len(shape)
    spec[best] = axis_name
    return P(*spec)


def _shape(x) -> tuple[int, ...]:
    return tuple(np.shape(x)) if not hasattr(x, "shape") else tuple(x.shape)


def tree_shardings(tree: Any, mesh: Mesh) -> Any:
    """The FSDP rule on every array leaf of ``tree`` (parameters, gradients, moments)."""
    n = mesh.shape["fsdp"]
    return jax.tree.map(lambda x: NamedSharding(mesh, leaf_spec(_shape(x), n)), tree)


def state_shardings(state: Mapping[str, Any], mesh: Mesh) -> dict[str, Any]:
    """Shardings for the training state ``{params, opt_state, raw_weights, meta_opt_state, step}``.

    ``params`` and ``opt_state`` follow the FSDP rule (scalars such as Adam's count come out
    replicated); the upper-level entries (:data:`REPLICATED_STATE_KEYS`) and any other key
    are replicated. Works on concrete arrays and on ``jax.ShapeDtypeStruct`` trees.
    """
    rep = replicated(mesh)
    out = {}
    for key, value in state.items():
        if key in ("params", "opt_state"):
            out[key] = tree_shardings(value, mesh)
        else:
            out[key] = jax.tree.map(lambda _: rep, value)
    return out


# ------------------------------------------------------------------------- batch rules

def batch_spec(rows: tuple[str, int], shape, mesh: Mesh, *, stacked: bool, shard_patches: bool = False) -> P:
    """Partition spec of one batch array whose rows are ``rows = (kind, axis)`` (the field's
    ``row_axis``; ``stacked``: the array carries a leading ``[T, ...]`` axis). See the module docstring."""
    shape = tuple(int(s) for s in shape)
    ndim = len(shape)
    kind, axis = rows
    if kind == PATCH_ROWS and not shard_patches:
        return P()
    axis += 1 if stacked else 0
    if axis >= ndim:
        return P()
    size = shape[axis]
    n_all, n_data = mesh.shape["data"] * mesh.shape["fsdp"], mesh.shape["data"]
    if n_all > 1 and size % n_all == 0:
        names: Any = BATCH_AXES
    elif n_data > 1 and size % n_data == 0:
        names = "data"
    else:
        return P()
    spec = [None] * ndim
    spec[axis] = names
    return P(*spec)


def batch_shardings(batch: Any, mesh: Mesh, stacked: bool, *, shard_patches: bool = False) -> Any:
    """``NamedSharding`` per array of a typed batch (``TrainBatch``, ``MetaBatch``, ``ModelInputs``;
    ``stacked``: ``[T, ...]``), in the batch's own structure, from each field's row axis."""
    if not dataclasses.is_dataclass(batch):
        raise TypeError(f"sharding.batch_shardings: expected a typed batch (TrainBatch, MetaBatch, ModelInputs), "
                        f"got {type(batch).__name__}")
    out = {}
    for field in dataclasses.fields(batch):
        value = getattr(batch, field.name)
        if value is None:
            out[field.name] = None
        elif dataclasses.is_dataclass(value):
            out[field.name] = batch_shardings(value, mesh, stacked, shard_patches=shard_patches)
        else:
            rows = row_axis(field)
            if rows is None:
                raise TypeError(f"sharding.batch_shardings: field {type(batch).__name__}.{field.name} declares no "
                                "row axis; expected one (rows_field) to derive its sharding")
            out[field.name] = NamedSharding(
                mesh, batch_spec(rows, _shape(value), mesh, stacked=stacked, shard_patches=shard_patches))
    return dataclasses.replace(batch, **out)


# ----------------------------------------------------------------- carried-state pinning

def constrain(tree: Any, mesh: Mesh) -> Any:
    """``with_sharding_constraint`` of every leaf to the FSDP rule (inside jit; vmap/jvp-safe)."""
    n = mesh.shape["fsdp"]

    def one(x):
        if not hasattr(x, "shape") or np.ndim(x) == 0:
            return x
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, leaf_spec(x.shape, n)))

    return jax.tree.map(one, tree)


def constrain_optimizer(optimizer: optax.GradientTransformation, mesh: Mesh) -> optax.GradientTransformation:
    """``optimizer`` whose ``update`` pins gradient, update and new state to the FSDP rule.

    The unroll carries ``(phi_t, s_t)`` through ``lax.scan``; pinning the optimizer's inputs
    and outputs fixes the carry's sharding (and that of the reverse-mode tape of
    ``exact``) instead of leaving it to propagation. Numerically the identity. An
    :class:`bilevel.inner.ReversibleAdamW` stays one (its constants kept), so ``exact_reversible``
    can still invert its steps.
    """
    if mesh.shape["fsdp"] <= 1:
        return optimizer

    def init(params):
        return optimizer.init(params)

    def update(grads, state, params=None, **extra):
        grads = constrain(grads, mesh)
        updates, state = optimizer.update(grads, state, params, **extra)
        return constrain(updates, mesh), constrain(state, mesh)

    if isinstance(optimizer, ReversibleAdamW):
        return ReversibleAdamW(init, update, optimizer.constants)
    return optax.GradientTransformation(init, update)


# ----------------------------------------------------------------------------- jit

def shard_bilevel_step(step_fn: Callable, state, inner_batches, meta_batch, mesh: Mesh, *,
                       shard_patches: bool = False, donate: bool = True):
    """``jax.jit(step_fn)`` with the rules above as ``in_shardings`` / ``out_shardings``.

    Args:
      step_fn: ``step(state, inner_batches, meta_batch) -> (state, metrics)``
        (:func:`dreamprm_jax.train.step.make_bilevel_step`).
      state, inner_batches, meta_batch: examples (arrays or ``jax.ShapeDtypeStruct``) that fix
        the shapes the shardings are computed from; a batch of another bucket gets its own
        shardings by calling this again (jit caches one program per shape).
      mesh: from :func:`make_mesh`.
      donate: donate the state (its buffers are reused for the new state).

    Returns:
      the jitted function; metrics come back replicated.
    """
    s_sh = state_shardings(state, mesh)
    in_sh = (s_sh, batch_shardings(inner_batches, mesh, True, shard_patches=shard_patches),
             batch_shardings(meta_batch, mesh, False, shard_patches=shard_patches))
    return jax.jit(step_fn, in_shardings=in_sh, out_shardings=(s_sh, replicated(mesh)),
                   donate_argnums=(0,) if donate else ())


class ShardedStep:
    """The bi-level iteration, jitted per batch-shape bucket with the sharding rules.

    ``step(state, inner_batches, meta_batch)`` places host (numpy) batches with
    :func:`put_batch` (every process passes the global batch and uploads its own shards)
    and calls the program compiled for their shapes (one per bucket, built on first use by
    :func:`shard_bilevel_step`; the state is donated). Drop-in for
    ``jit_bilevel_step(step_fn)`` in the training loop.
    """

    def __init__(self, step_fn: Callable, mesh: Mesh, *, shard_patches: bool = False, donate: bool = True):
        self.step_fn, self.mesh, self.shard_patches, self.donate = step_fn, mesh, shard_patches, donate
        self._programs: dict = {}
        self._traces = 0

    def _traced_step(self, state, inner_batches, meta_batch):
        # Runs in Python only when jit traces, i.e. once per program it builds.
        self._traces += 1
        return self.step_fn(state, inner_batches, meta_batch)

    def __call__(self, state, inner_batches, meta_batch):
        key = (_signature(inner_batches), _signature(meta_batch))
        program = self._programs.get(key)
        if program is None:
            program = shard_bilevel_step(self._traced_step, state, inner_batches, meta_batch, self.mesh,
                                         shard_patches=self.shard_patches, donate=self.donate)
            self._programs[key] = program
        ib = put_batch(inner_batches, self.mesh, stacked=True, shard_patches=self.shard_patches)
        mb = put_batch(meta_batch, self.mesh, stacked=False, shard_patches=self.shard_patches)
        return program(state, ib, mb)

    def compile_count(self) -> int:
        """Programs traced (and so compiled) so far: one per batch-shape bucket met."""
        return self._traces


def _signature(batch: Any) -> tuple:
    """The structure, shapes and dtypes of a batch: what decides its program."""
    leaves, treedef = jax.tree.flatten(batch)
    return treedef, tuple((_shape(x), str(x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype)) for x in leaves)


def shard_tree(tree: Any, mesh: Mesh) -> Any:
    """``tree`` (numpy or single-device arrays, the same global value on every process) placed
    with the FSDP rule (:func:`tree_shardings`); each process uploads only its shards. Use it for
    loaded parameters before :func:`sharded_init`: a jit over the mesh cannot take arrays
    committed to one local device when the mesh spans several processes."""
    return put(tree, tree_shardings(tree, mesh))


def sharded_init(init_fn: Callable[..., Any], mesh: Mesh, *args) -> Any:
    """``init_fn(*args)`` -> training state, built directly in its shards (jit with the state
    rules as ``out_shardings``): with a random initialisation inside ``init_fn`` no device
    ever holds the whole state. Pass arrays (e.g. loaded parameters) as ``args``, not by
    closure (a closure would embed them in the program as constants)."""
    abstract = jax.eval_shape(init_fn, *args)
    return jax.jit(init_fn, out_shardings=state_shardings(abstract, mesh))(*args)


def to_host(tree: Any, mesh: Mesh) -> Any:
    """numpy copy of a (possibly multi-host, sharded) tree on every host; every process must call it."""

    def one(x):
        if not isinstance(x, jax.Array):
            return np.asarray(x)
        if x.is_fully_addressable:
            return np.asarray(jax.device_get(x))
        x = jax.jit(lambda a: a, out_shardings=replicated(mesh))(x)
        return np.asarray(x.addressable_data(0))

    return jax.tree.map(one, tree)


# ------------------------------------------------------------------------- placement

def put(tree: Any, shardings: Any) -> Any:
    """Host -> device placement of ``tree`` (numpy or jax leaves) with ``shardings``.

    One process: ``jax.device_put``. Several processes: every process passes the *global*
    value of each leaf and uploads only the shards its devices hold
    (``jax.make_array_from_callback``).
    """
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)

    def one(x, sh):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return x  # already a global array
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sh, lambda idx: x[idx])

    return jax.tree.map(one, tree, shardings)


def put_batch(batch: Any, mesh: Mesh, *, stacked: bool, shard_patches: bool = False) -> Any:
    """:func:`put` of a typed batch (the global batch, on every process) with :func:`batch_shardings`."""
    return put(batch, batch_shardings(batch, mesh, stacked, shard_patches=shard_patches))
