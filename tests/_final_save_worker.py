"""Subprocess helper: the training command line, with a signal delivered at a chosen moment
of the end of the run.

    python tests/_final_save_worker.py WHEN -- TRAIN_ARGS...

WHEN:
  term_final_save  SIGTERM to itself as the final checkpoint's save starts (the save goes on);
  kill_final_save  SIGKILL to itself inside the final save, once orbax created the step's
                   temporary directory (nothing committed: only that directory is left);
  term_export      SIGTERM to itself as the export starts writing the model.

Then runs ``dreamprm_jax.cli.train.main(TRAIN_ARGS)`` and exits with its code (SIGKILL: -9).
The final save is the first *forced* save (periodic saves are not forced; a save forced by
an earlier signal would fire the hook too, but no other signal is sent).
"""

from __future__ import annotations

import os
import signal
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.expanduser("~"), ".cache", "dreamprm_jax_xla"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def _signal_self(signum: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signum)


def install(when: str) -> None:
    from orbax.checkpoint._src.path import atomicity

    from dreamprm_jax.models import prm
    from dreamprm_jax.train.checkpointing import Checkpointer

    if when in ("term_final_save", "kill_final_save"):
        original_save = Checkpointer.save
        original_create = atomicity.AtomicRenameTemporaryPath.create
        armed = {"on": False}

        async def create(self):
            out = await original_create(self)
            if armed["on"]:
                _signal_self(signal.SIGKILL)
            return out

        def save(self, step, state, extra=None, *, force=False):
            if force:
                if when == "term_final_save":
                    _signal_self(signal.SIGTERM)
                else:
                    armed["on"] = True
            return original_save(self, step, state, extra, force=force)

        Checkpointer.save = save
        atomicity.AtomicRenameTemporaryPath.create = create
    elif when == "term_export":
        original_prm_save = prm.save

        def prm_save(*args, **kwargs):
            _signal_self(signal.SIGTERM)
            return original_prm_save(*args, **kwargs)

        prm.save = prm_save
    else:
        raise SystemExit(f"_final_save_worker: unknown moment {when!r}")


if __name__ == "__main__":
    when, sep, *train_args = sys.argv[1:]
    assert sep == "--", "usage: _final_save_worker.py WHEN -- TRAIN_ARGS..."
    install(when)
    from dreamprm_jax.cli import train as train_cli

    sys.exit(train_cli.main(train_args))
