"""Subprocess helper for the kill / signal tests of dreamprm_jax.train.

    python tests/_ckpt_worker.py kill DIR {after_create|before_rename}
        saves step 1 completely, then starts saving step 2 and SIGKILLs itself inside that
        save: right after orbax created the step's tmp directory (nothing written yet), or
        just before the final rename (all data and commit_success.txt written).
        Exits 0 only if the hook never fired (which the test treats as a failure).

    python tests/_ckpt_worker.py loop DIR
        runs a tiny training loop under GracefulInterrupt, printing "ready" after step 1;
        on SIGTERM/SIGINT it force-saves the current step, prints "saved <step>" and exits 0.
        Exits 3 if no signal arrived within 60 s.

The state of step ``s`` is a deterministic function of ``s`` (:func:`state_at`) so the
parent can check that what it restores is exactly what was saved.
"""

from __future__ import annotations

import os
import signal
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


def state_at(step: int) -> dict:
    """A small multi-dtype training state that depends on ``step`` only."""
    key = jax.random.fold_in(jax.random.key(0), step)
    return {
        "params": {"w": jnp.arange(12, dtype=jnp.float32).reshape(3, 4) * step + 0.1,
                   "b": (jnp.arange(4, dtype=jnp.float32) / 3.0).astype(jnp.bfloat16)},
        "alpha": jnp.full((5,), 0.01 * step, jnp.float32),
        "step": jnp.int32(step),
        "rng": jax.random.key_data(key),  # uint32 [2]
    }


def extra_at(step: int) -> dict:
    return {"sampler": {"epoch": step // 7, "position": step * 3}, "note": f"step {step}"}


def _kill_self():
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def run_kill(directory: str, where: str) -> int:
    from orbax.checkpoint._src.path import atomicity

    from dreamprm_jax.train.checkpointing import Checkpointer

    ckpt = Checkpointer(directory, save_every=1, keep=3)
    ckpt.save(1, state_at(1), extra_at(1))
    step_dir_tmp = os.path.join(os.path.abspath(directory), "2" + atomicity.TMP_DIR_SUFFIX)

    if where == "after_create":
        original_create = atomicity.AtomicRenameTemporaryPath.create

        async def create(self):
            out = await original_create(self)
            if os.fspath(self.get()) == step_dir_tmp:
                _kill_self()
            return out

        atomicity.AtomicRenameTemporaryPath.create = create
    elif where == "before_rename":
        original_rename = atomicity.async_path.rename

        async def rename(src, dst):
            if os.fspath(src) == step_dir_tmp:
                _kill_self()
            return await original_rename(src, dst)

        atomicity.async_path.rename = rename
    else:
        raise SystemExit(f"_ckpt_worker: unknown kill point {where!r}")
    ckpt.save(2, state_at(2), extra_at(2))
    print("hook did not fire", flush=True)
    return 0


def run_loop(directory: str) -> int:
    from dreamprm_jax.train.checkpointing import Checkpointer
    from dreamprm_jax.train.interrupts import GracefulInterrupt

    ckpt = Checkpointer(directory, save_every=10_000, keep=2)
    deadline = time.monotonic() + 60.0
    with GracefulInterrupt() as stop:
        step = 0
        while time.monotonic() < deadline:
            step += 1
            state = state_at(step)  # "the update"
            ckpt.save(step, state, extra_at(step))  # periodic: never due here
            if step == 1:
                print("ready", flush=True)
            if stop.requested:
                ckpt.save(step, state, dict(extra_at(step), signal=stop.signal), force=True)
                ckpt.close()
                print(f"saved {step}", flush=True)
                return 0
            time.sleep(0.002)  # simulated step time; keeps the shared CPUs free
    return 3


if __name__ == "__main__":
    mode, directory = sys.argv[1], sys.argv[2]
    if mode == "kill":
        sys.exit(run_kill(directory, sys.argv[3]))
    if mode == "loop":
        sys.exit(run_loop(directory))
    raise SystemExit(f"_ckpt_worker: unknown mode {mode!r}")
