"""Tests of dreamprm_jax.train.sharding and dreamprm_jax.train.distributed.

The rule tests run in this process (abstract meshes, no compile). The numerical tests run
tests/_sharding_worker.py in subprocesses, because this pytest process has already
initialised jax with one CPU device: one worker with 8 host-platform CPU devices
(``--xla_force_host_platform_device_count=8``) runs the bi-level iteration of a tiny
Qwen2-VL PRM on meshes 1x1, 1x8, 2x4, 8x1 and the checkpoint round trip; two more workers
form a two-process ``jax.distributed`` run over 127.0.0.1. Mesh 1x1 is the single-device
run every other mesh is compared with.

Tolerance (float32): every compared array ``a`` (loss, hypergradient, updated parameter
leaf) satisfies ``|a - ref| <= 1e-5 * max(|ref|)`` elementwise, i.e. 1e-5 relative to the
array's scale (GSPMD changes only the association order of reductions).

``DREAMPRM_SHARDING_FULL=1`` runs every method on every mesh (12 compiles instead of 8).
XLA:CPU's backend optimisation is turned down in the workers (``--xla_backend_optimization_level=0``,
``--xla_llvm_disable_expensive_passes``) to cut compile time; every mesh runs with the same flags.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from dreamprm_jax.train import distributed, sharding
from processes import free_port, wait_all

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "_sharding_worker.py")
RTOL = 1e-5
FAST_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
METHODS = ("exact", "exact_forward", "darts")
MESHES = ("data=1,fsdp=1", "data=1,fsdp=8", "data=2,fsdp=4", "data=8,fsdp=1")


def _env(devices: int, **extra) -> dict:
    env = dict(os.environ)
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {FAST_XLA}",
               PYTHONPATH=os.path.dirname(HERE) + os.pathsep + env.get("PYTHONPATH", ""), **extra)
    return env


def _close(a, ref, what: str) -> None:
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    assert a.shape == ref.shape, f"{what}: shape {a.shape} != reference {ref.shape}"
    scale = max(float(np.max(np.abs(ref))) if ref.size else 0.0, 1e-30)
    err = float(np.max(np.abs(a - ref))) if ref.size else 0.0
    assert err <= RTOL * scale, f"{what}: max |a - ref| = {err:.3g} > {RTOL} * max|ref| = {RTOL * scale:.3g}"


def _compare(run: dict, ref: dict, what: str) -> None:
    _close(run["g"], ref["g"], f"{what} hypergradient")
    for key in ("inner_loss", "inner_loss_last", "meta_loss", "hypergrad_norm", "weights"):
        _close(run["metrics"][key], ref["metrics"][key], f"{what} metric {key}")
    assert run["params"].keys() == ref["params"].keys()
    for name in ref["params"]:
        _close(run["params"][name], ref["params"][name], f"{what} updated params{name}")


# ------------------------------------------------------------------------ rules (in-process)

def test_parse_mesh_spec():
    assert sharding.parse_mesh_spec(None, 8) == {"data": 1, "fsdp": 8}
    assert sharding.parse_mesh_spec("data=2,fsdp=4", 8) == {"data": 2, "fsdp": 4}
    assert sharding.parse_mesh_spec("data=2", 8) == {"data": 2, "fsdp": 4}
    assert sharding.parse_mesh_spec("fsdp=2", 8) == {"data": 4, "fsdp": 2}
    assert sharding.parse_mesh_spec("data=1,fsdp=1", 8) == {"data": 1, "fsdp": 1}  # first device only
    for bad in ("data=3", "model=2", "data=2,data=2", "data", "data=x", "data=4,fsdp=4"):
        with pytest.raises(ValueError, match="--mesh"):
            sharding.parse_mesh_spec(bad, 8)


def test_make_mesh_single_device():
    mesh = sharding.make_mesh()
    assert mesh.axis_names == ("data", "fsdp")
    assert mesh.shape["data"] * mesh.shape["fsdp"] >= 1


def test_leaf_spec_largest_divisible_dimension():
    assert sharding.leaf_spec((28, 1536, 8960), 8) == P(None, None, "fsdp")
    assert sharding.leaf_spec((151936, 1536), 8) == P("fsdp", None)
    assert sharding.leaf_spec((28, 12, 7), 4) == P("fsdp", None, None)  # 12 % 4 == 0 but 28 is larger
    assert sharding.leaf_spec((3, 5), 4) == P()  # nothing divisible: replicated
    assert sharding.leaf_spec((), 8) == P()
    assert sharding.leaf_spec((64, 64), 8) == P(None, "fsdp")  # ties: the later (output) dimension
    assert sharding.leaf_spec((1536,), 1) == P()


def test_state_shardings_replicate_upper_level():
    mesh = AbstractMesh((2, 4), ("data", "fsdp"))
    state = {"params": {"w": np.zeros((16, 8), np.float32)}, "opt_state": ({"mu": np.zeros((16, 8))},
                                                                          np.zeros((), np.int32)),
             "raw_weights": np.zeros((8,), np.float32), "meta_opt_state": {"m": np.zeros((8,))},
             "step": np.zeros((), np.int32)}
    sh = sharding.state_shardings(state, mesh)
    assert sh["params"]["w"].spec == P("fsdp", None)
    assert sh["opt_state"][0]["mu"].spec == P("fsdp", None)
    assert sh["opt_state"][1].spec == P()
    assert sh["raw_weights"].spec == P() and sh["meta_opt_state"]["m"].spec == P() and sh["step"].spec == P()


def _abstract(cls, **shapes):
    import dataclasses

    import jax

    return cls(**{f.name: (jax.ShapeDtypeStruct(shapes[f.name], np.float32) if f.name in shapes else None)
                  for f in dataclasses.fields(cls) if f.name in shapes or f.default is None})


def test_batch_specs():
    """Each field's partition spec comes from the row axis the typed batch declares for it."""
    from dreamprm_jax.data.types import MetaBatch, ModelInputs, TrainBatch

    mesh = AbstractMesh((2, 4), ("data", "fsdp"))
    both = ("data", "fsdp")

    def specs(batch, stacked, **kw):
        sh = sharding.batch_shardings(batch, mesh, stacked, **kw)
        return {**{f: getattr(sh, f).spec for f in ("labels", "domain_ids", "sample_mask", "step_mask", "chain_mask")
                   if hasattr(sh, f)},
                **{f: getattr(sh.inputs, f).spec for f in ("input_ids", "position_ids", "pixel_values")
                   if getattr(sh.inputs, f) is not None}}

    model = dict(input_ids=(8, 32), attention_mask=(8, 32), position_ids=(3, 8, 32), pixel_values=(64, 96))
    inputs = _abstract(ModelInputs, **model)
    train = specs(TrainBatch(inputs, *(jax_sd((8,)) for _ in range(3))), False)
    assert train["input_ids"] == P(both, None) and train["position_ids"] == P(None, both, None)
    assert train["labels"] == P(both) and train["pixel_values"] == P()  # patch rows replicated by default
    stacked_inputs = _abstract(ModelInputs, **{k: (5,) + v for k, v in model.items()})
    stacked = specs(TrainBatch(stacked_inputs, *(jax_sd((5, 8)) for _ in range(3))), True)
    assert stacked["input_ids"] == P(None, both, None) and stacked["position_ids"] == P(None, None, both, None)
    assert stacked["labels"] == P(None, both) and stacked["pixel_values"] == P()
    meta = specs(MetaBatch(inputs, jax_sd((4, 2)), jax_sd((4,)), jax_sd((4,))), False)
    assert meta["step_mask"] == P("data", None)  # 4 chains: divisible by data only
    meta3 = specs(MetaBatch(inputs, jax_sd((3, 2)), jax_sd((3,)), jax_sd((3,))), False)
    assert meta3["labels"] == P() and meta3["chain_mask"] == P()  # neither: replicated
    assert specs(TrainBatch(inputs, *(jax_sd((8,)) for _ in range(3))), False,
                 shard_patches=True)["pixel_values"] == P(both, None)
    odd = _abstract(ModelInputs, **dict(model, pixel_values=(63, 96)))
    assert specs(TrainBatch(odd, *(jax_sd((8,)) for _ in range(3))), False, shard_patches=True)["pixel_values"] == P()
    with pytest.raises(TypeError, match="typed batch"):
        sharding.batch_shardings({"input_ids": np.zeros((8, 32))}, mesh, False)


def jax_sd(shape):
    import jax

    return jax.ShapeDtypeStruct(shape, np.float32)


def test_distributed_resolve_env_and_flags():
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "2"}
    cfg = distributed.resolve(env=env)
    assert cfg == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 2,
                   "local_device_ids": None}
    assert distributed.resolve(process_id=3, env=env)["process_id"] == 3  # flags win
    assert distributed.resolve(env={})["num_processes"] == 1
    assert distributed.initialize(env={}) == distributed.resolve(env={})  # one process: no-op
    with pytest.raises(ValueError, match="coordinator"):
        distributed.resolve(num_processes=2, process_id=0, env={})
    with pytest.raises(ValueError, match="process_id"):
        distributed.resolve(num_processes=2, process_id=2, coordinator_address="h:1", env={})
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES"):
        distributed.resolve(env={"JAX_NUM_PROCESSES": "two"})


def test_host_rows_single_process():
    import jax
    from jax.sharding import NamedSharding

    mesh = sharding.make_mesh()
    rows = 2 * mesh.size  # any device count: the rows split evenly over the mesh
    sh = NamedSharding(mesh, P(("data", "fsdp")))
    assert distributed.host_rows(sh, (rows, 3)).tolist() == list(range(rows))
    assert distributed.host_slice(sh, (rows, 3)) == slice(0, rows)
    assert distributed.host_rows(sh, (rows, 3), process_index=jax.process_count()).size == 0


def _typed_batches(seq_len: int, T: int = 2, B: int = 4, M: int = 2, S: int = 2):
    from dreamprm_jax.data.types import MetaBatch, ModelInputs, TrainBatch

    def inputs(lead, rows):
        ids = np.ones(lead + (rows, seq_len), np.int32)
        return ModelInputs(ids, ids, np.zeros(lead + (3, rows, seq_len), np.int32))

    inner = TrainBatch(inputs((T,), B), labels=np.full((T, B), 0.5, np.float32), domain_ids=np.zeros((T, B), np.int32),
                       sample_mask=np.ones((T, B), np.float32))
    meta = MetaBatch(inputs((), M * S), step_mask=np.ones((M, S), np.float32), labels=np.ones((M,), np.float32),
                     chain_mask=np.ones((M,), np.float32))
    return inner, meta


def test_sharded_step_counts_one_program_per_batch_shape():
    import jax.numpy as jnp

    def step(state, inner, meta):
        total = jnp.sum(inner.labels) + jnp.sum(meta.labels) + jnp.sum(inner.inputs.attention_mask)
        return dict(state, step=state["step"] + 1), {"total": total}

    mesh = sharding.make_mesh()
    state = sharding.sharded_init(lambda w: {"params": {"w": w}, "opt_state": (), "raw_weights": jnp.zeros((3,)),
                                             "step": jnp.zeros((), jnp.int32)}, mesh, jnp.ones((8,)))
    sharded = sharding.ShardedStep(step, mesh)
    for seq_len, programs in ((8, 1), (8, 1), (16, 2), (8, 2)):
        state, metrics = sharded(state, *_typed_batches(seq_len))
        assert sharded.compile_count() == programs, (seq_len, sharded.compile_count())
    assert int(state["step"]) == 4 and float(metrics["total"]) == 2 * 4 * 0.5 + 2 + 2 * 4 * 8  # exact: small ints


def test_sharded_init_and_to_host():
    import jax.numpy as jnp
    import optax

    mesh = sharding.make_mesh()
    opt = sharding.constrain_optimizer(optax.adam(1e-3), mesh)

    def init(w):
        return {"params": {"w": w}, "opt_state": opt.init({"w": w}), "raw_weights": jnp.zeros((3,)),
                "step": jnp.zeros((), jnp.int32)}

    state = sharding.sharded_init(init, mesh, jnp.ones((4, 2)))
    host = sharding.to_host(state, mesh)
    np.testing.assert_array_equal(host["params"]["w"], np.ones((4, 2)))  # exact: a copy
    assert isinstance(host["raw_weights"], np.ndarray)


# --------------------------------------------------------------- numerics (8-device worker)

@pytest.fixture(scope="module")
def mesh_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sharding")
    out = tmp / "meshes.json"
    grid = "full" if os.environ.get("DREAMPRM_SHARDING_FULL") else "quick"
    proc = subprocess.run([sys.executable, WORKER, "meshes", str(out), str(tmp / "ckpt"), grid], env=_env(8),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{WORKER} meshes failed:\n{proc.stderr[-4000:]}"
    with open(out) as f:
        return json.load(f)


@pytest.mark.parametrize("method", METHODS)
def test_meshes_match_single_device(mesh_results, method):
    runs = mesh_results["runs"][method]
    ref = runs["data=1,fsdp=1"]
    assert len(runs) >= 2, f"{method}: only the reference ran"
    for spec, run in runs.items():
        if spec != "data=1,fsdp=1":
            _compare(run, ref, f"{method} on {spec}")
    assert np.max(np.abs(ref["g"])) > 0, f"{method}: zero hypergradient; the test would be vacuous"


def test_state_is_actually_sharded(mesh_results):
    runs = mesh_results["runs"]["exact"]
    for spec in ("data=1,fsdp=8", "data=2,fsdp=4"):
        specs = runs[spec]["param_specs"]
        sharded = [k for k, v in specs.items() if "fsdp" in v]
        assert len(sharded) >= len(specs) // 2, f"{spec}: few parameters sharded: {specs}"
        moments = runs[spec]["opt_state_specs"]  # the state coming out of the unroll keeps the rule
        assert sum("fsdp" in v for v in moments.values()) >= 2 * len(sharded), moments
    assert all("fsdp" not in v for v in runs["data=8,fsdp=1"]["param_specs"].values())


def test_checkpoint_2x4_restores_on_other_meshes(mesh_results):
    cont = mesh_results["continue"]
    assert cont["data=1,fsdp=1"]["extra"] == {"mesh": "data=2,fsdp=4"}
    assert all(s.startswith("8:") for s in mesh_results["restored_specs"]["data=8,fsdp=1"])
    assert all(s.startswith("1:") for s in mesh_results["restored_specs"]["data=1,fsdp=1"])
    # the straight two-iteration single-device run is the reference for the continued runs
    straight = mesh_results["runs"]["exact"]["data=1,fsdp=1"]
    for spec in ("data=1,fsdp=1", "data=8,fsdp=1", "data=2,fsdp=4"):
        for key in ("inner_loss", "meta_loss", "weights"):
            _close(cont[spec]["metrics"][key], straight["history"][1][key], f"continued on {spec}: {key}")
        for name, ref in straight["params_final"].items():
            _close(cont[spec]["params"][name], ref, f"continued on {spec}: params{name}")


# ------------------------------------------------------------ two processes over loopback

def test_two_process_run_matches_single_process(mesh_results, tmp_path):
    out = tmp_path / "multihost.json"
    port = free_port()
    procs = []
    for pid in range(2):
        env = _env(2, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid))
        procs.append(subprocess.Popen([sys.executable, WORKER, "multihost", str(out)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    errors = wait_all(procs, timeout=600)
    assert not errors, "\n".join(errors)
    with open(out) as f:
        multi = json.load(f)
    assert multi["process_count"] == 2 and multi["devices"] == 4 and multi["local_devices"] == 2
    assert multi["local_rows"] == 4  # each host uploaded 4 of the 8 rows of a batch
    straight = mesh_results["runs"]["exact"]["data=1,fsdp=1"]
    for i in range(2):
        for key in ("inner_loss", "meta_loss", "hypergrad_norm", "weights"):
            _close(multi["history"][i][key], straight["history"][i][key], f"two-process iteration {i + 1}: {key}")
    for name, ref in straight["params_final"].items():
        _close(multi["params"][name], ref, f"two-process params{name}")
