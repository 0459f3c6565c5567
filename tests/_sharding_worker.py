"""Subprocess helper for tests/test_sharding.py (needs its own jax with 8 CPU devices).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
        python tests/_sharding_worker.py meshes OUT.json CKPT_DIR
        one bi-level iteration per (method, mesh) for methods exact / exact_forward / darts on
        meshes 1x1, 1x8, 2x4, 8x1 plus an unsharded single-device reference; then the
        checkpoint round trip 2x4 -> {1x1, 8x1}. Writes every result as lists to OUT.json.

    JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=i \\
    XLA_FLAGS=--xla_force_host_platform_device_count=2 JAX_PLATFORMS=cpu \\
        python tests/_sharding_worker.py multihost OUT.json
        two processes x 2 CPU devices, mesh data=2,fsdp=2; every process passes the global batch
        and uploads only its own rows (sharding.put_batch); ITERS exact iterations; process 0
        writes OUT.json.

    python tests/_sharding_worker.py single OUT.json
        the same ITERS iterations on one device (the multi-host reference).

The data: the tiny Qwen2-VL config (patch 4, merge 2); every other sample carries a
16x16 px image (grid 1x4x4 = 16 patches -> 4 image tokens, the tiny analogue of a 56 px
image at patch 14), padded to a patch bucket with padding rows; B = 8 train rows, T = 2
inner steps, meta M = 4 chains x S = 2 steps (8 rows).
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

# the suite's persistent compile cache (tests/conftest.py): reruns skip XLA work
jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.expanduser("~"), ".cache", "dreamprm_jax_xla"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
import numpy as np  # noqa: E402
import optax  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from dreamprm_jax.data.types import MetaBatch, TrainBatch  # noqa: E402
from dreamprm_jax.models import prm, qwen2_vl  # noqa: E402
from dreamprm_jax.train import distributed, sharding  # noqa: E402
from dreamprm_jax.train import step as step_lib  # noqa: E402

METHODS = ("exact", "exact_forward", "darts")
MESHES = ("data=1,fsdp=1", "data=1,fsdp=8", "data=2,fsdp=4", "data=8,fsdp=1")
T, B, M, S, L, K = 2, 8, 4, 2, 24, 3
ITERS = 3


def _config():
    return qwen2_vl.tiny()


def _model_batch(config, rng, rows: int, with_images: bool = True):
    """Right-padded rows; every other row has one 4x4-patch image."""
    v = config.vision
    merge = v.spatial_merge_size ** 2
    grid = (1, 4, 4)
    n_img_tokens = grid[0] * grid[1] * grid[2] // merge
    ids = np.zeros((rows, L), np.int32)
    mask = np.zeros((rows, L), np.int32)
    grids, patches = [], []
    for r in range(rows):
        n = int(rng.integers(L // 2, L + 1))
        toks = list(rng.integers(1, config.vision_start_token_id - 1, size=n))
        if with_images and r % 2 == 0:
            img = [config.vision_start_token_id] + [config.image_token_id] * n_img_tokens + [config.vision_end_token_id]
            toks = toks[:2] + img + toks[2:]
            toks = toks[:n]
            grids.append(grid)
            patches.append(rng.normal(size=(int(np.prod(grid)), v.patch_dim)).astype(np.float32))
        ids[r, :len(toks)] = toks
        mask[r, :len(toks)] = 1
    pixel = np.concatenate(patches) if patches else None
    thw = np.asarray(grids, np.int64) if grids else None
    n_patches = (0 if pixel is None else pixel.shape[0]) + 16  # a patch bucket with 16 padding rows
    return qwen2_vl.prepare_batch(config, ids, mask, pixel, thw, num_patches=n_patches)


def make_data(config, seed: int = 0, iters: int = 1):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(iters):
        inner = []
        for _ in range(T):
            inputs = _model_batch(config, rng, B)
            labels = rng.uniform(size=(B,)).astype(np.float32)
            domain_ids = rng.integers(0, K, size=(B,)).astype(np.int32)
            sample_mask = np.ones((B,), np.float32)
            sample_mask[-1] = 0.0
            inner.append(TrainBatch(inputs, labels=labels, domain_ids=domain_ids, sample_mask=sample_mask))
        inner = jax.tree.map(lambda *xs: np.stack(xs), *inner)  # [T, ...]
        inputs = _model_batch(config, rng, M * S)
        step_mask = np.ones((M, S), np.float32)
        step_mask[1, 1] = 0.0
        labels = (rng.uniform(size=(M,)) > 0.5).astype(np.float32)
        meta = MetaBatch(inputs, step_mask=step_mask, labels=labels, chain_mask=np.ones((M,), np.float32))
        out.append((inner, meta))
    return out


def host_state(config, optimizer, meta_opt):
    params = prm.init(config, jax.random.key(1), qwen2_vl.init_params(config, jax.random.key(0)))
    return jax.device_get(step_lib.init_state(params, K, optimizer, meta_opt))


ADAM_EPS = 1e-3
METHOD_OPTIONS = {"darts": {"R": 0.1}}


def optimizers():
    """Inner AdamW (lr 1e-3, so one step moves the parameters visibly) and meta SGD(lr=1):
    with SGD(1) and r_0 = 0 the updated raw weights are exactly ``-g``, so the hypergradient
    is read off the state without compiling a second program.

    Conditioning: Adam's first step is ``u = -lr g / (|g| + eps)``, whose derivative in ``g``
    is ``lr eps / (|g| + eps)^2``, up to ``lr / eps`` at ``g = 0``. With the default
    ``eps = 1e-8`` the exact hypergradient amplifies float32 rounding of near-zero gradient
    entries by ~1e8 x lr, so two float32 runs that differ only in the association order of
    a reduction (1x1 vs 8 devices) give hypergradients ~1e-2 apart (measured on this very
    problem) - a property of the maths, not of the sharding. The sharding test therefore
    uses ``eps = 1e-3`` (amplification <= lr / eps = 1) and darts with ``R = 0.1`` (the
    central difference divides by ``2 R / ||v||``); every mesh runs the same optimizer.
    """
    from dreamprm_jax import bilevel

    inner = bilevel.inner_adamw(bilevel.step_lr(1e-3, 5000, 0.5), eps=ADAM_EPS, weight_decay=0.01)
    return inner, optax.sgd(1.0)


def _np(tree):
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)).tolist(), tree)


def _flat(tree):
    return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def run_method(config, method, mesh_spec, data, state0, iters: int = 1):
    """``iters`` iterations on ``mesh_spec`` from ``state0`` -> (host results, (jitted step, state))."""
    optimizer, meta_opt = optimizers()
    inner, meta = data[0]
    mesh = sharding.make_mesh(mesh_spec)
    optimizer = sharding.constrain_optimizer(optimizer, mesh)
    step_fn = step_lib.make_bilevel_step(config, optimizer, meta_opt, method=method,
                                         method_options=METHOD_OPTIONS.get(method))
    step = sharding.shard_bilevel_step(step_fn, state0, inner, meta, mesh)
    state = sharding.put(state0, sharding.state_shardings(state0, mesh))
    param_specs = {k: str(v.sharding.spec) for k, v in _flat(state["params"]).items()}
    history, g, first_params = [], None, None
    for i in range(iters):
        ib, mb = (sharding.put_batch(data[i][0], mesh, stacked=True), sharding.put_batch(data[i][1], mesh, stacked=False))
        raw_before = np.asarray(jax.device_get(state["raw_weights"]))
        state, metrics = step(state, ib, mb)
        if g is None:
            g = raw_before - np.asarray(jax.device_get(state["raw_weights"]))  # meta SGD(1): r' = r - g
        history.append(_np({k: v for k, v in metrics.items() if k != "finite"}))
        if first_params is None:
            first_params = {k: np.asarray(v).tolist() for k, v in _flat(jax.device_get(state["params"])).items()}
    out_specs = {k: str(v.sharding.spec) for k, v in _flat(state["opt_state"]).items()}
    return {"g": g.tolist(), "metrics": history[0], "history": history,
            "params": first_params,  # after the first iteration
            "params_final": {k: np.asarray(v).tolist() for k, v in _flat(jax.device_get(state["params"])).items()},
            "param_specs": param_specs, "opt_state_specs": out_specs}, (step, state)


QUICK = {"exact": MESHES, "exact_forward": ("data=1,fsdp=1", "data=2,fsdp=4"),
         "darts": ("data=1,fsdp=1", "data=2,fsdp=4")}
FULL = {m: MESHES for m in METHODS}


def meshes(out_path: str, ckpt_dir: str, grid: str = "quick") -> None:
    """Every (method, mesh) of the grid; mesh 1x1 is the single-device reference."""
    from dreamprm_jax.train.checkpointing import Checkpointer

    config = _config()
    optimizer, meta_opt = optimizers()
    state0 = host_state(config, optimizer, meta_opt)
    data = make_data(config, iters=2)
    results: dict = {"devices": jax.device_count(), "grid": grid, "runs": {}}
    steps, state_24 = {}, None
    for method, specs in (FULL if grid == "full" else QUICK).items():
        results["runs"][method] = {}
        for spec in specs:
            iters = 2 if (method == "exact" and spec == "data=1,fsdp=1") else 1
            res, (step, new_state) = run_method(config, method, spec, data, state0, iters=iters)
            results["runs"][method][spec] = res
            if method == "exact":
                steps[spec] = step
                if spec == "data=2,fsdp=4":
                    state_24 = new_state
    # --- checkpoint written on 2x4, restored on 1x1 and 8x1, continued ---------------------
    inner2, meta2 = data[1]
    ckpt = Checkpointer(ckpt_dir, save_every=0, keep=None)
    ckpt.save(1, state_24, {"mesh": "data=2,fsdp=4"}, force=True)
    ckpt.wait_until_finished()
    cont, restored_specs = {}, {}
    for spec in ("data=1,fsdp=1", "data=8,fsdp=1", "data=2,fsdp=4"):
        mesh = sharding.make_mesh(spec)
        target = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=sh),
                              state0, sharding.state_shardings(state0, mesh))
        restored, extra = ckpt.restore(1, target)
        restored_specs[spec] = sorted({f"{len(x.sharding.device_set)}:{x.sharding.spec}"
                                       for x in jax.tree.leaves(restored)})
        raw_before = np.asarray(jax.device_get(restored["raw_weights"]))
        new, m = steps[spec](restored, sharding.put_batch(inner2, mesh, stacked=True),
                             sharding.put_batch(meta2, mesh, stacked=False))
        cont[spec] = {"params": {k: np.asarray(v).tolist() for k, v in _flat(jax.device_get(new["params"])).items()},
                      "g": (raw_before - np.asarray(jax.device_get(new["raw_weights"]))).tolist(),
                      "metrics": _np({k: v for k, v in m.items() if k != "finite"}), "extra": extra}
    ckpt.close()
    results["continue"] = cont
    results["restored_specs"] = restored_specs
    with open(out_path, "w") as f:
        json.dump(results, f)


def _replicated_host(x, mesh):
    """The global value of a (possibly multi-process) array, on every host."""
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    x = jax.jit(lambda a: a, out_shardings=sharding.replicated(mesh))(x)
    return np.asarray(x.addressable_data(0))


def _local_rows(x: jax.Array, axis: int) -> int:
    """Distinct rows along ``axis`` of ``x`` that this process's devices hold."""
    return len({i for shard in x.addressable_shards for i in range(*shard.index[axis].indices(x.shape[axis]))})


def multihost(out_path: str) -> None:
    """Two processes, mesh data=2,fsdp=2; each process passes the global batch and uploads its own rows."""
    distributed.initialize()
    config = _config()
    optimizer, meta_opt = optimizers()
    state0 = host_state(config, optimizer, meta_opt)
    data = make_data(config, iters=2)  # the same data as the 'meshes' run's 1x1 exact reference
    mesh = sharding.make_mesh("data=2,fsdp=2")
    optimizer = sharding.constrain_optimizer(optimizer, mesh)
    step_fn = step_lib.make_bilevel_step(config, optimizer, meta_opt, method="exact")
    step = sharding.shard_bilevel_step(step_fn, state0, data[0][0], data[0][1], mesh)
    state = sharding.put(state0, sharding.state_shardings(state0, mesh))
    history, rows = [], None
    for inner, meta in data:
        ib = sharding.put_batch(inner, mesh, stacked=True)
        mb = sharding.put_batch(meta, mesh, stacked=False)
        rows = _local_rows(ib.inputs.input_ids, 1)  # [T, B, L]: rows on axis 1
        state, metrics = step(state, ib, mb)
        history.append(_np({k: _replicated_host(v, mesh) for k, v in metrics.items() if k != "finite"}))
    params = {k: _replicated_host(v, mesh).tolist() for k, v in _flat(state["params"]).items()}
    if jax.process_index() == 0:
        with open(out_path, "w") as f:
            json.dump({"history": history, "params": params, "local_rows": rows,
                       "process_count": jax.process_count(), "devices": jax.device_count(),
                       "local_devices": jax.local_device_count()}, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "meshes":
        meshes(sys.argv[2], sys.argv[3], sys.argv[4] if len(sys.argv) > 4 else "quick")
    elif mode == "multihost":
        multihost(sys.argv[2])
    else:
        raise SystemExit(f"unknown mode {mode!r}")
