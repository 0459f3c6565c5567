"""Tests for dreamprm_jax.train.interrupts: signals become a flag; SIGTERM -> save -> exit 0."""

import os
import signal
import subprocess
import sys
import threading

import jax
import numpy as np
import pytest

from dreamprm_jax.train.checkpointing import Checkpointer
from dreamprm_jax.train.interrupts import GracefulInterrupt

sys.path.insert(0, os.path.dirname(__file__))
from _ckpt_worker import extra_at, state_at  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "tests", "_ckpt_worker.py")


def test_signals_set_flag_and_handlers_are_restored():
    before_int = signal.getsignal(signal.SIGINT)
    before_term = signal.getsignal(signal.SIGTERM)
    with GracefulInterrupt(verbose=False) as stop:
        assert stop.installed and not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.signal == signal.SIGTERM
        os.kill(os.getpid(), signal.SIGTERM)  # repeated SIGTERM: only noted
        assert stop.requested and stop.signal == signal.SIGTERM
    assert not stop.installed
    assert signal.getsignal(signal.SIGINT) is before_int
    assert signal.getsignal(signal.SIGTERM) is before_term


def test_second_sigint_raises_keyboard_interrupt():
    before_int = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        with GracefulInterrupt(verbose=False) as stop:
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.requested and stop.signal == signal.SIGINT
            assert signal.getsignal(signal.SIGINT) == stop._handler
            os.kill(os.getpid(), signal.SIGINT)
            pytest.fail("second SIGINT did not raise")
    assert signal.getsignal(signal.SIGINT) is before_int


def test_inert_outside_main_thread():
    seen = {}

    def body():
        with GracefulInterrupt(verbose=False) as stop:
            seen["installed"] = stop.installed
            stop.request()
            seen["requested"] = stop.requested

    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert seen == {"installed": False, "requested": True}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_to_training_process_saves_and_exits_zero(tmp_path, sig):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, WORKER, "loop", str(tmp_path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, (proc.returncode, out, err[-2000:])
    saved_step = int(out.strip().split()[-1])
    assert f"{signal.Signals(sig).name} received" in err

    with Checkpointer(tmp_path) as ckpt:
        step, state, extra = ckpt.restore_latest(jax.eval_shape(lambda: state_at(0)))
    assert step == saved_step >= 1
    assert extra == dict(extra_at(step), signal=int(sig))
    for a, b in zip(jax.tree.leaves(state_at(step)), jax.tree.leaves(state)):  # exact
        assert a.dtype == b.dtype and np.asarray(a).tobytes() == np.asarray(b).tobytes()
