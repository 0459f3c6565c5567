"""Step checkpoints of an arbitrary training-state pytree, on orbax-checkpoint.

A checkpoint is one directory per step under ``directory``::

    directory/
      100/
        _CHECKPOINT_METADATA
        state/   # the pytree: orbax StandardCheckpointHandler (OCDBT + zarr arrays)
        extra/   # a JSON object: data-sampler position, config, anything JSON-able
      200/
      ...

Everything that has to come back bitwise lives in ``state`` (parameters, optimizer
states, domain-weight logits, the PRNG key as ``jax.random.key_data(key)`` -> uint32
``[2]``, or as a typed key, which orbax stores as its key data). Everything that is small,
host-side and human-readable lives in ``extra``.

Atomicity (verified against orbax-checkpoint 0.12.8, see tests/test_train_checkpointing.py)
----------------------------------------------------------------------------------------
orbax writes step ``N`` into ``directory/N.orbax-checkpoint-tmp`` (each item into its own
``*.orbax-checkpoint-tmp`` sub-directory), writes a ``commit_success.txt`` and only then
``rename``s the directory to ``directory/N`` (``AtomicRenameTemporaryPath.finalize``). A
POSIX rename inside one file system is atomic, so a reader sees either no step ``N`` or a
complete one. A process killed (even by SIGKILL) while writing step ``N`` leaves only the
``.orbax-checkpoint-tmp`` directory behind; orbax does not list it as a step, so
``restore_latest`` returns step ``N - 1`` untouched, and the constructor of this class
removes the leftover (``cleanup_tmp_directories=True``, awaited before it returns). Old steps are deleted only after the new
one is committed, so ``keep`` never drops below one complete checkpoint. (On object stores
such as GCS, orbax uses a commit-file protocol instead of rename; the guarantee is the
same but is not exercised by our tests.)

Saving is synchronous by default: ``save`` returns after the rename, so a SIGTERM handler
(:class:`dreamprm_jax.train.interrupts.GracefulInterrupt`) can finish a save before the
process exits. ``async_save=True`` lets orbax write in a background thread (the device
arrays are copied to host first, so the caller may donate / overwrite them at once); call
:meth:`Checkpointer.wait_until_finished` or :meth:`Checkpointer.close` before exit.

Sharding is left to orbax: ``restore_latest`` takes a *target* pytree of
``jax.ShapeDtypeStruct`` (optionally carrying ``.sharding``) or of concrete arrays, so a
sharded restore onto another mesh is a matter of passing shardings in the target.

Example::

    ckpt = Checkpointer("runs/x/ckpt", save_every=500, keep=3)
    restored = ckpt.restore_latest(abstract_like(state))   # state: freshly initialised
    start = 0
    if restored is not None:
        start, state, extra = restored
        sampler.load_state_dict(extra["sampler"])
    for step in range(start + 1, total + 1):
        state = update(state, ...)
        ckpt.save(step, state, {"sampler": sampler.state_dict()})     # every save_every steps
    ckpt.save(total, state, {"sampler": sampler.state_dict()}, force=True)   # and at the end
    ckpt.close()
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from dreamprm_jax.utils.jsonable import to_jsonable

__all__ = ["CheckpointConfig", "Checkpointer", "abstract_like"]

_STATE = "state"
_EXTRA = "extra"


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """How often and how many checkpoints to keep.

    Attributes:
      save_every: save when ``step % save_every == 0`` (``0``: only forced saves).
      keep: number of most recent checkpoints kept on disk (``None``: keep all).
      async_save: write in a background thread (see the module docstring).
    """

    save_every: int = 1000
    keep: int | None = 3
    async_save: bool = False

    def __post_init__(self):
        if self.save_every < 0:
            raise ValueError(f"CheckpointConfig.save_every must be >= 0, got {self.save_every}")
        if self.keep is not None and self.keep < 1:
            raise ValueError(f"CheckpointConfig.keep must be >= 1 or None, got {self.keep}")


def abstract_like(tree: Any) -> Any:
    """A restore target shaped like ``tree``: ``jax.Array`` -> ``jax.ShapeDtypeStruct``.

    The struct keeps the array's dtype (typed PRNG keys included) and its sharding, so the
    restored array lands where the live one was. numpy leaves are kept as they are (orbax
    restores a numpy target as numpy, so e.g. int64 / float64 survive even without
    ``jax_enable_x64``, which ``jax.eval_shape`` would narrow to 32 bits). Other leaves
    are returned unchanged.
    """

    def leaf(x):
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        return x

    return jax.tree.map(leaf, tree)


def _key_name(entry: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _path_str(path: tuple) -> str:
    return "/".join(_key_name(p) for p in path)


def _is_prng_key(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


class Checkpointer:
    """Saves and restores ``(step, state pytree, extra JSON)`` in a step directory.

    Args:
      directory: root directory (created if missing); made absolute.
      save_every: periodic interval used by :meth:`save` (``0``: forced saves only).
      keep: keep the ``keep`` most recent steps (``None``: keep all).
      async_save: background writes (see the module docstring); default synchronous.
      config: a :class:`CheckpointConfig` instead of the three keywords above.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        save_every: int = 1000,
        keep: int | None = 3,
        async_save: bool = False,
        config: CheckpointConfig | None = None,
    ):
        self.config = config or CheckpointConfig(save_every=save_every, keep=keep, async_save=async_save)
        self.directory = os.path.abspath(os.fspath(directory))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=self.config.keep,
            enable_async_checkpointing=self.config.async_save,
            cleanup_tmp_directories=True,  # remove leftovers of a save killed mid-write
            create=True,
        )
        self._closed = False
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={_STATE: ocp.StandardCheckpointHandler(), _EXTRA: ocp.JsonCheckpointHandler()},
        )
        # orbax removes leftover tmp directories in a background future that it awaits at
        # the first save; wait here so the directory is clean once the constructor returns.
        await_cleanup = getattr(self._manager, "_maybe_await_cleanup_tmp_directory", None)
        if await_cleanup is not None:
            await_cleanup()

    # ----------------------------------------------------------------- queries
    def all_steps(self) -> list[int]:
        """Committed steps on disk, ascending (in-progress tmp directories excluded)."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The most recent committed step, or ``None`` if there is none."""
        return self._manager.latest_step()

    def should_save(self, step: int) -> bool:
        """Whether :meth:`save` without ``force`` saves at ``step``."""
        every = self.config.save_every
        return every > 0 and step % every == 0

    # ------------------------------------------------------------------- save
    def save(self, step: int, state: Any, extra: Mapping[str, Any] | None = None, *, force: bool = False) -> bool:
        """Saves ``state`` and ``extra`` as step ``step`` if due (or ``force``).

        Args:
          step: non-negative training step; the checkpoint directory's name.
          state: pytree of jax / numpy arrays (and Python scalars) to restore bitwise.
          extra: JSON-able mapping (numpy scalars and arrays are converted to lists).
          force: save even if ``step`` is not a multiple of ``save_every``.

        Returns:
          True if a save was made (started, with ``async_save``); False if it was not due or
          step ``step`` is already on disk (e.g. the final save coinciding with a periodic
          one).
        """
        step = int(step)
        if step < 0:
            raise ValueError(f"Checkpointer.save: step must be >= 0, got {step}")
        if not (force or self.should_save(step)):
            return False
        if step in self._manager.all_steps():
            return False
        extra_json = to_jsonable(dict(extra or {}), where=f"{self.directory}/{step}/extra")
        args = ocp.args.Composite(**{_STATE: ocp.args.StandardSave(state), _EXTRA: ocp.args.JsonSave(extra_json)})
        return bool(self._manager.save(step, args=args, force=True))

    def wait_until_finished(self) -> None:
        """Blocks until an in-flight asynchronous save is committed (no-op when sync)."""
        self._manager.wait_until_finished()

    # ---------------------------------------------------------------- restore
    def restore(self, step: int, abstract_state: Any = None, *, allow_cast: bool = False) -> tuple[Any, dict]:
        """Restores step ``step`` -> ``(state, extra)``.

        Args:
          step: a committed step (see :meth:`all_steps`).
          abstract_state: target pytree with the saved structure: leaves are
            ``jax.ShapeDtypeStruct`` (restored as ``jax.Array``; a ``.sharding`` on them is
            honoured), ``jax.Array`` (restored with that array's sharding) or
            ``np.ndarray`` (restored as numpy). ``None`` restores as saved, on the default
            device.
          allow_cast: if False (default) a target dtype that differs from the stored dtype
            is an error, because orbax would otherwise cast silently and the restore would
            no longer be bitwise.

        Raises:
          FileNotFoundError: no committed step ``step``.
          ValueError: structure, shape or (unless ``allow_cast``) dtype mismatch.
        """
        step = int(step)
        if step not in self._manager.all_steps():
            raise FileNotFoundError(
                f"{self.directory}: no committed checkpoint for step {step} (have {self.all_steps()})"
            )
        if abstract_state is not None and not allow_cast:
            self._check_dtypes(step, abstract_state)
        args = ocp.args.Composite(
            **{_STATE: ocp.args.StandardRestore(abstract_state), _EXTRA: ocp.args.JsonRestore()}
        )
        restored = self._manager.restore(step, args=args)
        extra = restored[_EXTRA]
        return restored[_STATE], dict(extra) if extra is not None else {}

    def restore_extra(self, step: int) -> dict:
        """The ``extra`` JSON of step ``step`` alone (the state is not read).

        Raises:
          FileNotFoundError: no committed step ``step``.
        """
        step = int(step)
        if step not in self._manager.all_steps():
            raise FileNotFoundError(
                f"{self.directory}: no committed checkpoint for step {step} (have {self.all_steps()})"
            )
        restored = self._manager.restore(step, args=ocp.args.Composite(**{_EXTRA: ocp.args.JsonRestore()}))
        extra = restored[_EXTRA]
        return dict(extra) if extra is not None else {}

    def restore_latest(self, abstract_state: Any = None, *, allow_cast: bool = False) -> tuple[int, Any, dict] | None:
        """Restores the most recent committed step -> ``(step, state, extra)``, or ``None``.

        See :meth:`restore` for ``abstract_state`` and ``allow_cast``. ``None`` is returned
        when the directory holds no committed checkpoint (a fresh run).
        """
        step = self.latest_step()
        if step is None:
            return None
        state, extra = self.restore(step, abstract_state, allow_cast=allow_cast)
        return step, state, extra

    def _check_dtypes(self, step: int, abstract_state: Any) -> None:
        """Compares target leaves with the stored array metadata, by tree path."""
        metadata = self._manager.item_metadata(step)[_STATE]
        tree = getattr(metadata, "tree", metadata)
        if tree is None:
            return
        stored = {
            _path_str(path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
        }
        for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_state)[0]:
            name = _path_str(path)
            meta = stored.get(name)
            if meta is None or _is_prng_key(leaf) or not hasattr(leaf, "dtype"):
                continue  # structure errors are left to orbax; typed keys are stored as key data
            stored_dtype = getattr(meta, "dtype", None)
            stored_shape = getattr(meta, "shape", None)
            if stored_shape is not None and tuple(stored_shape) != tuple(np.shape(leaf)):
                raise ValueError(
                    f"{self.directory}/{step}/state: leaf '{name}' is stored with shape "
                    f"{tuple(stored_shape)}, the restore target has shape {tuple(np.shape(leaf))}"
                )
            if stored_dtype is not None and np.dtype(stored_dtype) != np.dtype(leaf.dtype):
                raise ValueError(
                    f"{self.directory}/{step}/state: leaf '{name}' is stored as {np.dtype(stored_dtype)}, "
                    f"the restore target asks for {np.dtype(leaf.dtype)} (pass allow_cast=True to cast)"
                )

    # ------------------------------------------------------------------ close
    def close(self) -> None:
        """Waits for pending saves and releases orbax resources. Idempotent."""
        if not self._closed:
            self._manager.wait_until_finished()
            self._manager.close()
            self._closed = True

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpointer({self.directory!r}, {self.config})"

