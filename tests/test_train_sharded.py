"""The training loop on device meshes: ``train()`` on 1x1 vs 2 devices, and two processes.

The pytest process has already initialised jax with one CPU device, so the runs happen in
subprocesses with forced host-platform devices (``--xla_force_host_platform_device_count``):

* this file run as a script (``python tests/test_train_sharded.py meshes DATA OUT.json``) with
  2 devices calls ``train()`` on the tiny config of tests/test_train_loop.py with
  ``--mesh data=1,fsdp=1`` (the single-device program) and with the default mesh (every
  device on ``fsdp``: parameters, moments and batch rows split in two);
* ``python -m experiments.train --num-processes 2 --process-id i --coordinator-address
  127.0.0.1:PORT`` twice, one CPU device each (gloo collectives over loopback): the same
  1x2 mesh spanning two processes, each uploading its own rows of the global batch.

Method and tolerances (float32). The runs use ``--hypergradient darts_exact`` (an exact mixed
Hessian-vector product at the final inner parameters), not the default ``exact``: the
trainer's inner AdamW has ``eps = 1e-8`` (``TrainConfig`` has no eps field) and ``exact``
differentiates Adam's ``u = -lr g / (|g| + eps)``, whose slope ``lr eps / (|g| + eps)^2`` reaches
``lr / eps`` for near-zero gradient entries, so the association-order rounding of the
sharded reductions is amplified up to ~1e8 x lr. Measured on this config: ``exact`` on 1x1
vs 1x2 gives hypergradient norms 18 % apart at iteration 1 and, after the meta AdamW step
(close to ``-lr sign g``), domain weights 1.2e-2 apart - a property of the maths, not of the
wiring (tests/_sharding_worker.py shows ``exact`` agreeing to 1e-5 across meshes with
eps = 1e-3). ``darts_exact`` does not differentiate through Adam; measured 1x1 vs 1x2:
losses <= 1.8e-6 relative, hypergradient norm <= 1.3e-5 relative, weights <= 1.2e-7. Asserted:
``|a - ref| <= RTOL * |ref|`` with RTOL = 1e-5 for the losses and the domain weights and
1e-4 for the hypergradient norm (the mixed product is taken at parameters whose
near-zero-gradient entries Adam's forward step already moved by ~lr in a rounding-dependent
direction). The two-process run is compared with the one-process 2-device run (same mesh,
same partitioned program, only the collectives differ) at the same tolerances.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from processes import free_port, wait_all  # noqa: E402
from tests.tiny_run import tiny_config, train  # noqa: E402 - tiny_data is a conftest fixture

FAST_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
ITERATIONS = 3
RTOL = 1e-5  # losses and domain weights (see the module docstring)
HYPERGRAD_RTOL = 1e-4  # the hypergradient norm
LOSSES = ("inner_loss", "inner_loss_last", "meta_loss")


def _env(devices: int, **extra) -> dict:
    env = dict(os.environ)
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {FAST_XLA}",
               PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""), TOKENIZERS_PARALLELISM="false", **extra)
    for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        if key not in extra:
            env.pop(key, None)
    return env


def _history(out_dir: str) -> list[dict]:
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _run_kwargs(mesh):
    return dict(mesh=mesh, iterations=ITERATIONS, checkpoint_every=2, export=True, hypergradient="darts_exact")


def _assert_close(a, ref, what: str, rtol: float) -> None:
    """``|a - ref| <= rtol * |ref|`` elementwise (atol = 0)."""
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    err = np.abs(a - ref)
    bound = rtol * np.abs(ref)
    assert np.all(err <= bound), f"{what}: |a - ref| = {err.tolist()} > {rtol} * |ref| = {bound.tolist()}"


def _weights(record: dict, domains) -> list[float]:
    return [record["domain_weights"][d] for d in domains]


def _compare_runs(history, ref_history, weights, ref_weights, what: str) -> None:
    """Every logged metric of every iteration and the final weights, at the module's tolerances."""
    assert [r["step"] for r in history] == [r["step"] for r in ref_history] == list(range(1, ITERATIONS + 1))
    domains = sorted(ref_weights)
    for t, r in zip(history, ref_history):
        it = r["step"]
        for key in LOSSES:
            _assert_close(t[key], r[key], f"{what}, iteration {it}: {key}", RTOL)
        _assert_close(t["hypergrad_norm"], r["hypergrad_norm"], f"{what}, iteration {it}: hypergrad_norm",
                      HYPERGRAD_RTOL)
        _assert_close(_weights(t, domains), _weights(r, domains), f"{what}, iteration {it}: domain weights", RTOL)
    _assert_close([weights[d] for d in domains], [ref_weights[d] for d in domains], f"{what}: final weights", RTOL)


# ------------------------------------------------------------------ subprocess worker

def _worker_meshes(data_dir: str, out_json: str) -> None:
    import jax

    jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.expanduser("~"), ".cache", "dreamprm_jax_xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    results = {"devices": jax.device_count()}
    for name, mesh in (("1x1", "data=1,fsdp=1"), ("default", None)):
        out_dir = os.path.join(os.path.dirname(out_json), name)
        result = train(tiny_config(data_dir, out_dir, **_run_kwargs(mesh)))
        results[name] = {"weights": dict(zip(result.domains, result.weights.tolist())), "step": result.step,
                         "history": _history(out_dir),
                         "compile_count": result.compile_count, "out_dir": out_dir}
    with open(out_json, "w") as f:
        json.dump(results, f)


# ------------------------------------------------------------------------------ tests

def test_help_documents_device_flags(capsys):
    from dreamprm_jax.cli.train import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--mesh", "--coordinator-address", "--num-processes", "--process-id"):
        assert flag in text, f"--help does not list {flag}"
    assert "data=D,fsdp=F" in text and "JAX_COORDINATOR_ADDRESS" in text and "JAX_PROCESS_ID" in text


@pytest.fixture(scope="module")
def mesh_runs(tiny_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train_sharded")
    out = str(tmp / "meshes.json")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "meshes", tiny_data, out], env=_env(2),
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"meshes worker failed:\n{proc.stderr[-4000:]}"
    with open(out) as f:
        return json.load(f)


def test_two_devices_match_one(mesh_runs):
    assert mesh_runs["devices"] == 2
    ref, two = mesh_runs["1x1"], mesh_runs["default"]
    assert ref["step"] == two["step"] == ITERATIONS
    assert ref["compile_count"] == two["compile_count"] == 1  # one bucket, no warm-up: one program
    _compare_runs(two["history"], ref["history"], two["weights"], ref["weights"], "mesh 1x2 vs 1x1")
    assert max(abs(w - 1.0) for w in ref["weights"].values()) > 1e-3, "weights never moved: the test is vacuous"
    for run in (ref, two):
        assert os.path.isfile(os.path.join(run["out_dir"], "export", "prm_head.safetensors"))


def test_two_processes_match_one_process(mesh_runs, tiny_data, tmp_path):
    """``python -m experiments.train`` as two processes of one device each (mesh 1x2 over both)."""
    out = str(tmp_path / "two_processes")
    cfg = tiny_config(tiny_data, out, **_run_kwargs(None))
    args = [sys.executable, "-m", "experiments.train", "--train-json", cfg.train_json, "--meta-json", cfg.meta_json,
            "--image-root", cfg.image_root, "--cache-dir", cfg.cache_dir, "--out-dir", out,
            "--model-hidden-size", "32", "--model-layers", "1", "--train-batch-size", "4", "--meta-batch-size", "2",
            "--unroll", "2", "--seq-buckets", "192", "--patch-buckets", "256", "--log-every", "1",
            "--progress", "false", "--iterations", str(ITERATIONS), "--checkpoint-every", "2", "--meta-warmup", "0", "--meta-lr-warmup", "0",
            "--hypergradient", cfg.hypergradient,
            "--coordinator-address", f"127.0.0.1:{free_port()}", "--num-processes", "2"]
    procs = [subprocess.Popen(args + ["--process-id", str(pid)], cwd=REPO, env=_env(1), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for pid in range(2)]
    errors = wait_all(procs, timeout=400)
    assert not errors, "\n".join(errors)

    ref = mesh_runs["default"]  # one process, two devices: the same mesh and program
    with open(os.path.join(out, "domain_weights.json")) as f:
        exported = json.load(f)  # written by process 0 only, like metrics.jsonl
    _compare_runs(_history(out), ref["history"], exported, ref["weights"], "two processes vs one")
    assert os.path.isfile(os.path.join(out, "export", "prm_head.safetensors"))
    assert sorted(int(s) for s in os.listdir(os.path.join(out, "checkpoints")) if s.isdigit()) == [2, 3]


if __name__ == "__main__":
    if sys.argv[1] == "meshes":
        _worker_meshes(sys.argv[2], sys.argv[3])
    else:
        raise SystemExit(f"unknown mode {sys.argv[1]!r}")
