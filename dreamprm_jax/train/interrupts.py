"""Graceful stop on SIGINT / SIGTERM: finish the step, save a checkpoint, exit 0.

Schedulers (SLURM, Kubernetes, preemptible VMs) send SIGTERM some seconds before SIGKILL;
a user presses Ctrl-C. Either way the training loop should not die inside a jitted step
or, worse, inside a checkpoint write. :class:`GracefulInterrupt` turns the signal into a
flag the loop polls between steps::

    with GracefulInterrupt() as stop:
        for step in range(start + 1, total + 1):
            state = update(state, batch)
            ckpt.save(step, state, extra)
            if stop.requested:
                ckpt.save(step, state, extra, force=True)   # synchronous: done before exit
                break
    # exit code 0; a rerun resumes from `step`

Semantics:

- first SIGINT or SIGTERM: ``requested`` becomes True, ``signal`` records which one, a
  one-line note goes to stderr; nothing is raised.
- a second SIGINT: the previous SIGINT handler is put back and ``KeyboardInterrupt`` is
  raised at once (the impatient user's escape hatch; a checkpoint being written is still
  safe, because orbax commits by atomic rename).
- further SIGTERMs are only noted (schedulers may repeat SIGTERM; SIGKILL is the hard stop).
- on exit from the ``with`` block the previous handlers are restored.
- handlers can only be installed from the main thread; elsewhere the context manager is
  inert (``installed`` is False) and ``requested`` only changes through :meth:`request`.
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType
from typing import Any, Iterable

__all__ = ["GracefulInterrupt"]


class GracefulInterrupt:
    """Context manager that converts SIGINT / SIGTERM into a polled flag.

    Args:
      signals: the signals to intercept (default SIGINT and SIGTERM).
      verbose: print a one-line note to stderr when a signal arrives.

    Attributes:
      requested: True once a stop was requested (signal or :meth:`request`).
      signal: the number of the first signal received, or None.
      installed: True while our handlers are installed.
    """

    def __init__(self, signals: Iterable[int] = (signal.SIGINT, signal.SIGTERM), *, verbose: bool = True):
        self.signals = tuple(signals)
        self.verbose = verbose
        self.requested = False
        self.signal: int | None = None
        self.installed = False
        self._previous: dict[int, Any] = {}

    def request(self) -> None:
        """Requests a stop without a signal (e.g. a wall-clock budget ran out)."""
        self.requested = True

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        del frame
        name = signal.Signals(signum).name
        if self.requested and signum == signal.SIGINT:
            self._restore(signal.SIGINT)
            if self.verbose:
                print(f"[GracefulInterrupt] second {name}: stopping now", file=sys.stderr, flush=True)
            raise KeyboardInterrupt
        if not self.requested:
            self.requested = True
            self.signal = signum
            if self.verbose:
                hint = " (Ctrl-C again to stop at once)" if signal.SIGINT in self.signals else ""
                print(
                    f"[GracefulInterrupt] {name} received: finishing the step and saving a checkpoint{hint}",
                    file=sys.stderr,
                    flush=True,
                )
        elif self.verbose:
            print(f"[GracefulInterrupt] {name} received again: still saving", file=sys.stderr, flush=True)

    def _restore(self, signum: int) -> None:
        if signum in self._previous:
            previous = self._previous.pop(signum)
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)

    def __enter__(self) -> "GracefulInterrupt":
        if threading.current_thread() is not threading.main_thread():
            return self  # signal.signal only works in the main thread: stay inert
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._handler)
        self.installed = True
        return self

    def __exit__(self, *exc) -> None:
        for signum in list(self._previous):
            self._restore(signum)
        self.installed = False
