"""The run directory: checked before anything is loaded or compiled, and what ``--resume`` may do.

A run writes everything (checkpoints, metrics, export, ``data_report.json``) into one
directory. A directory that cannot be written should stop the run in its first second with
one line, not after the data was encoded and the step compiled with a ``PermissionError``
traceback; :func:`check_out_dir` does that (it creates the directory and writes and removes
a probe file, so read-only mounts and root-owned folders are caught as well as modes).

Resume modes (:data:`RESUME_MODES`, ``TrainConfig.resume``):

- ``never``: start at step 0;
- ``always`` (``--resume``): continue from the latest committed checkpoint; none is an
  error that names the directory (a mistyped ``--out-dir`` must not train from scratch);
- ``auto``: continue when there is a checkpoint, else start at step 0 (what a job script
  that is restarted after preemption wants).
"""

from __future__ import annotations

import os
import tempfile

__all__ = ["RESUME_MODES", "RunDirError", "check_out_dir", "resume_mode", "saved_config"]

RESUME_MODES = ("never", "always", "auto")


class RunDirError(ValueError):
    """The run directory cannot be used (not writable, a file, a missing parent, no checkpoint
    to resume); the message is one line naming the directory."""


def resume_mode(value: bool | str) -> str:
    """``value`` as one of :data:`RESUME_MODES` (``True`` = ``always``, ``False`` = ``never``)."""
    if isinstance(value, bool):
        return "always" if value else "never"
    if isinstance(value, str) and value.lower() in RESUME_MODES:
        return value.lower()
    raise ValueError(f"resume: expected one of {list(RESUME_MODES)} (or a boolean), got {value!r}")


def check_out_dir(out_dir: str, *, create_parents: bool = True) -> str:
    """Make sure ``out_dir`` is a directory this process can write; returns its absolute path.

    Args:
      out_dir: the run directory (created when missing).
      create_parents: create missing parent directories too. ``False`` (an ``--out-dir``
        given on the command line): the parent must exist, so a mistyped path is reported
        rather than created.

    Raises:
      RunDirError: ``out_dir`` (or a parent) is a file, a parent is missing
        (``create_parents=False``), or the directory cannot be created or written.
    """
    path = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(path) and not os.path.isdir(path):
        raise RunDirError(f"--out-dir {out_dir}: is a file; expected a directory (or a path to create one at)")
    parent = os.path.dirname(path)
    if not create_parents and not os.path.isdir(parent):
        what = "is a file" if os.path.exists(parent) else "does not exist"
        raise RunDirError(f"--out-dir {out_dir}: the parent directory {parent} {what}; expected an existing directory")
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=path)
        os.close(fd)
        os.remove(probe)
    except FileExistsError:
        raise RunDirError(f"--out-dir {out_dir}: a parent of it is a file; expected directories") from None
    except NotADirectoryError:
        raise RunDirError(f"--out-dir {out_dir}: a parent of it is a file; expected directories") from None
    except OSError as e:
        raise RunDirError(f"--out-dir {out_dir}: not writable ({e.strerror or type(e).__name__}); expected a "
                          "directory this user can create and write") from None
    return path


def saved_config(run_dir: str):
    """``(TrainConfig, committed checkpoint steps)`` of a run: the configuration the trainer saved
    with its latest checkpoint, with ``out_dir`` set to ``run_dir`` (the run's tokenizer is read
    from there). What lets a finished run be audited or scored again from its directory alone.

    Raises:
      FileNotFoundError: no checkpoint directory, or no committed checkpoint in it.
      ValueError: the checkpoint carries no configuration.
    """
    import dataclasses

    from dreamprm_jax.configs import TrainConfig
    from dreamprm_jax.train.checkpointing import Checkpointer

    ckpt_dir = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"{ckpt_dir}: no checkpoint directory; expected a run written by python -m "
                                "experiments.train (train with e.g. --checkpoint-every 60 --keep-checkpoints 10)")
    with Checkpointer(ckpt_dir, keep=None) as checkpointer:
        available = checkpointer.all_steps()
        if not available:
            raise FileNotFoundError(f"{ckpt_dir}: no committed checkpoint")
        extra = checkpointer.restore_extra(available[-1])
    if "config" not in extra:
        raise ValueError(f"{ckpt_dir}/{available[-1]}/extra: no 'config' field; expected the TrainConfig "
                         "that python -m experiments.train saves with every checkpoint")
    cfg = TrainConfig.from_dict(extra["config"], where=f"{ckpt_dir}/{available[-1]}/extra.config")
    return dataclasses.replace(cfg, out_dir=run_dir), list(available)
