"""A run killed or interrupted during its final checkpoint or its export, then resumed: the
save completes before the process exits, or ``--resume`` continues from the last completed
step and says so; never a silent restart."""

from __future__ import annotations

import os
import subprocess
import sys

from dreamprm_jax.cli import train as train_cli
from dreamprm_jax.train.checkpointing import Checkpointer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "tests", "_final_save_worker.py")


def train_args(data_dir: str, out_dir: str, *, iterations: int = 3, checkpoint_every: int = 2) -> list[str]:
    return ["--train-json", os.path.join(data_dir, "train.json"), "--meta-json", os.path.join(data_dir, "meta.json"),
            "--image-root", data_dir, "--cache-dir", os.path.join(data_dir, "cache"), "--out-dir", out_dir,
            "--model-hidden-size", "32", "--model-layers", "1", "--train-batch-size", "4", "--meta-batch-size", "2",
            "--unroll", "2", "--seq-buckets", "192", "--patch-buckets", "256", "--log-every", "1",
            "--progress", "false", "--export", "true", "--meta-warmup", "0", "--meta-lr-warmup", "0",
            "--iterations", str(iterations), "--checkpoint-every", str(checkpoint_every)]


def run_worker(when: str, args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    return subprocess.run([sys.executable, WORKER, when, "--", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=400)


def steps_on_disk(out_dir: str) -> list[int]:
    with Checkpointer(os.path.join(out_dir, "checkpoints")) as ckpt:
        return ckpt.all_steps()


def test_sigkill_in_the_final_save_resumes_from_the_last_completed_step(tiny_data, tmp_path, capsys):
    out = str(tmp_path / "run")
    killed = run_worker("kill_final_save", train_args(tiny_data, out))
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert steps_on_disk(out) == [2]  # step 3 was being written: only step 2 is complete
    assert not os.path.exists(os.path.join(out, "export"))

    assert train_cli.main(train_args(tiny_data, out) + ["--resume"]) == 0
    captured = capsys.readouterr()
    assert "resuming from step 2" in captured.err
    assert "3 iterations in" in captured.out and "[interrupted]" not in captured.out
    assert steps_on_disk(out)[-1] == 3
    assert os.path.isfile(os.path.join(out, "export", "prm_head.safetensors"))


def test_sigkill_in_the_final_save_without_a_periodic_checkpoint_is_no_silent_restart(tiny_data, tmp_path, capsys):
    out = str(tmp_path / "run")
    args = train_args(tiny_data, out, iterations=2, checkpoint_every=100)
    killed = run_worker("kill_final_save", args)
    assert killed.returncode == -9, killed.stderr[-3000:]

    assert train_cli.main(args + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert f"no checkpoint in {os.path.join(out, 'checkpoints')}" in err and "--resume auto" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_sigterm_in_the_final_save_finishes_it_then_resume_exports(tiny_data, tmp_path, capsys):
    out = str(tmp_path / "run")
    stopped = run_worker("term_final_save", train_args(tiny_data, out))
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert "[interrupted]" in stopped.stdout
    assert steps_on_disk(out)[-1] == 3  # the save that the signal interrupted was completed
    assert not os.path.exists(os.path.join(out, "export"))  # the export is left for --resume

    assert train_cli.main(train_args(tiny_data, out) + ["--resume"]) == 0
    captured = capsys.readouterr()
    assert "resuming from step 3" in captured.err and "[interrupted]" not in captured.out
    assert os.path.isfile(os.path.join(out, "export", "prm_head.safetensors"))
    assert os.path.isfile(os.path.join(out, "domain_weights.json"))


def test_sigterm_during_the_export_lets_it_finish(tiny_data, tmp_path):
    out = str(tmp_path / "run")
    finished = run_worker("term_export", train_args(tiny_data, out, iterations=2))
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "[interrupted]" not in finished.stdout
    assert os.path.isfile(os.path.join(out, "export", "prm_head.safetensors"))
    assert os.path.isfile(os.path.join(out, "domain_weights.json"))
    assert not [name for name in os.listdir(out) if name.startswith(".export-")]  # no temporary left behind
