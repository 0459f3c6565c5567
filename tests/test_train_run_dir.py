"""The run directory is checked before any work, and ``--resume`` never trains from scratch
by accident: one-line errors, nonzero exit, no traceback."""

from __future__ import annotations

import dataclasses
import os
import stat

import pytest

from dreamprm_jax import configs
from dreamprm_jax.cli import train as train_cli
from dreamprm_jax.train import loop
from dreamprm_jax.train.run_dir import RunDirError, check_out_dir, resume_mode


def cli_error(capsys, argv: list[str]) -> str:
    """Run the training command line, expecting exit 2 with a one-line error; returns it."""
    assert train_cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    return err


def test_out_dir_that_is_a_file(tmp_path, capsys):
    target = tmp_path / "run"
    target.write_text("not a directory")
    with pytest.raises(RunDirError, match="is a file"):
        check_out_dir(str(target))
    generated = tmp_path / "generated"
    err = cli_error(capsys, ["--out-dir", str(target), "--data-dir", str(generated), "--progress", "false"])
    assert err.startswith(f"error: --out-dir {target}: is a file")
    assert not generated.exists()  # refused before the benchmark was generated


def test_out_dir_with_a_missing_parent(tmp_path, capsys):
    target = tmp_path / "typo" / "run"
    with pytest.raises(RunDirError, match=f"parent directory {tmp_path / 'typo'} does not exist"):
        check_out_dir(str(target), create_parents=False)
    assert check_out_dir(str(target)) == str(target)  # library callers may ask for the parents
    generated = tmp_path / "generated"
    err = cli_error(capsys, ["--out-dir", str(tmp_path / "other" / "run"), "--data-dir", str(generated),
                             "--progress", "false"])
    assert "does not exist" in err and not generated.exists()


def test_out_dir_under_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunDirError, match="is a file"):
        check_out_dir(str(tmp_path / "file" / "run"), create_parents=False)
    with pytest.raises(RunDirError, match="a parent of it is a file"):
        check_out_dir(str(tmp_path / "file" / "deeper" / "run"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through directory modes")
def test_out_dir_without_write_permission(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        with pytest.raises(RunDirError, match="not writable"):
            check_out_dir(str(locked / "run"))
        err = cli_error(capsys, ["--out-dir", str(locked), "--data-dir", str(tmp_path / "g"), "--progress", "false"])
        assert "not writable" in err
    finally:
        locked.chmod(stat.S_IRWXU)


def test_out_dir_on_a_read_only_file_system(capsys):
    target = "/sys/dreamprm-jax-run"
    if not os.path.isdir("/sys") or os.access("/sys", os.W_OK) and _can_mkdir(target):
        pytest.skip("no read-only /sys here")
    with pytest.raises(RunDirError, match="not writable"):
        check_out_dir(target)
    err = cli_error(capsys, ["--out-dir", target, "--progress", "false"])
    assert err.startswith(f"error: --out-dir {target}: not writable")


def _can_mkdir(path: str) -> bool:
    try:
        os.mkdir(path)
    except OSError:
        return False
    os.rmdir(path)
    return True


def test_resume_without_a_checkpoint_names_the_directory(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    generated = tmp_path / "generated"
    err = cli_error(capsys, ["--resume", "--out-dir", str(empty), "--data-dir", str(generated), "--progress", "false"])
    assert f"no checkpoint in {empty / 'checkpoints'}" in err and "--resume auto" in err
    assert not generated.exists()
    # a mistyped out-dir (missing) is the same error, not a fresh run
    err = cli_error(capsys, ["--resume", "--out-dir", str(tmp_path / "emtpy"), "--data-dir", str(generated),
                             "--progress", "false"])
    assert "no checkpoint in" in err


def test_resume_modes():
    cfg = configs.default()
    assert cfg.resume == "never"
    assert dataclasses.replace(cfg, resume=True).resume == "always"  # library code may pass booleans
    assert dataclasses.replace(cfg, resume=False).resume == "never"
    with pytest.raises(ValueError, match="resume: expected one of"):
        dataclasses.replace(cfg, resume="sometimes")
    assert resume_mode("AUTO") == "auto"
    parser, defaults = train_cli.build_parser([])
    parse = lambda *argv: configs.from_arguments(parser.parse_args(list(argv)), defaults).resume  # noqa: E731
    assert parse() == "never" and parse("--resume") == "always" and parse("--resume", "auto") == "auto"
    assert parse("--resume", "never") == "never"
    with pytest.raises(SystemExit):
        parse("--resume", "sometimes")


def test_resume_auto_without_a_checkpoint_passes_the_check(tmp_path):
    cfg = dataclasses.replace(configs.default(), out_dir=str(tmp_path / "fresh"), resume="auto")
    loop.check_run_dir(cfg)
    with pytest.raises(RunDirError, match="no checkpoint in"):
        loop.check_run_dir(dataclasses.replace(cfg, resume="always"))
