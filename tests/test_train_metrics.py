"""Tests for dreamprm_jax.train.metrics (JSON Lines, resume truncation, TensorBoard) and
dreamprm_jax.train.plots (PNG output)."""

import builtins
import json
import os
import warnings

import jax.numpy as jnp
import numpy as np
import pytest

from dreamprm_jax.train import metrics as metrics_lib
from dreamprm_jax.train.metrics import MetricsLogger, format_postfix, read_jsonl
from dreamprm_jax.train.plots import domain_weight_series, plot_domain_weights, plot_losses

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _log_run(out_dir, steps, **kw):
    with MetricsLogger(out_dir, **kw) as logger:
        for s in steps:
            logger.log(s, {"inner_loss": jnp.float32(1.0 / s), "meta_loss": np.float64(0.5 / s),
                           "domain_weights": {"a": 1.0 + 0.01 * s, "b": 1.0 - 0.01 * s},
                           "alpha": jnp.arange(3, dtype=jnp.float32) * s, "n": np.int32(s)})


def test_jsonl_records_are_json_and_typed(tmp_path):
    _log_run(tmp_path, [1, 2, 3])
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    r = records[1]
    assert r["inner_loss"] == pytest.approx(0.5, rel=1e-7)  # float32 1/2 is exact
    assert r["meta_loss"] == 0.25
    assert r["domain_weights"] == {"a": pytest.approx(1.02, rel=1e-12), "b": pytest.approx(0.98, rel=1e-12)}
    assert r["alpha"] == [0.0, 2.0, 4.0] and r["n"] == 2 and isinstance(r["n"], int)
    assert isinstance(r["time"], float)
    # TensorBoard event files (tensorboardX is a project dependency)
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path / "tb"))


def test_resume_truncates_steps_after_checkpoint_and_torn_tail(tmp_path):
    _log_run(tmp_path, range(1, 11))
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 11, "inner_lo')  # killed mid-write
    with pytest.raises(ValueError, match=r"metrics.jsonl:11: not a JSON object"):
        read_jsonl(tmp_path / "metrics.jsonl", skip_torn_last_line=False)
    # the run restarts from the checkpoint of step 6 and logs steps 7..8 again
    with MetricsLogger(tmp_path, resume_step=6) as logger:
        assert logger.dropped == 5  # steps 7..10 and the torn line
        for s in (7, 8):
            logger.log(s, meta_loss=-float(s))
    records = read_jsonl(tmp_path / "metrics.jsonl", skip_torn_last_line=False)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert records[-1]["meta_loss"] == -8.0 and "inner_loss" not in records[-1]
    assert not os.path.exists(tmp_path / "metrics.jsonl.tmp")
    # resume_step=None appends; resume_step=0 starts from scratch
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        assert logger.dropped == 0
        logger.log(9, x=1)
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")][-2:] == [8, 9]
    MetricsLogger(tmp_path, resume_step=0, tensorboard=False).close()
    assert read_jsonl(tmp_path / "metrics.jsonl") == []


def test_nonfinite_values_become_null_and_reserved_keys(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        with pytest.warns(RuntimeWarning, match="meta_loss_nan_test"):
            logger.log(1, meta_loss_nan_test=float("nan"))
        with pytest.raises(ValueError, match="'step' is reserved"):
            logger.log(2, step=3)
        with pytest.raises(TypeError, match=r"metrics\.bad: value of type"):
            logger.log(2, bad=object())
    line = (tmp_path / "metrics.jsonl").read_text().strip()
    assert json.loads(line)["meta_loss_nan_test"] is None and "NaN" not in line


def test_missing_tensorboardx_warns_once_and_continues(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("tensorboardX"):
            raise ImportError("no tensorboardX here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    monkeypatch.setattr(metrics_lib, "_WARNED", set())
    with pytest.warns(RuntimeWarning, match="tensorboardX unavailable"):
        first = MetricsLogger(tmp_path / "a")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = MetricsLogger(tmp_path / "b")  # no second warning
    for logger in (first, second):
        logger.log(1, loss=0.5)
        logger.close()
        logger.close()  # idempotent
    assert not os.path.exists(tmp_path / "a" / "tb")
    assert read_jsonl(tmp_path / "a" / "metrics.jsonl")[0]["loss"] == 0.5


def test_format_postfix():
    record = {"step": 3, "time": 1.0, "inner_loss": 0.123456789, "meta_loss": None, "n": 4,
              "w": [1.0, 0.5], "dw": {"a": 2.0}}
    assert format_postfix(record) == {"inner_loss": "0.1235", "meta_loss": "nan", "n": "4"}
    assert format_postfix(record, keys=["w", "dw", "absent"], digits=2) == {"w": "1/0.5", "dw": "2"}
    assert format_postfix({"x": jnp.float32(2.5)}) == {"x": "2.5"}


def _assert_png(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == PNG_SIGNATURE
    width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    assert width > 100 and height > 100


def test_plots_write_valid_pngs(tmp_path):
    _log_run(tmp_path, range(1, 21))
    log = tmp_path / "metrics.jsonl"
    steps, names, weights = domain_weight_series(log)
    assert names == ["a", "b"] and weights.shape == (20, 2) and steps[-1] == 20
    np.testing.assert_allclose(weights[:, 0] + weights[:, 1], 2.0, rtol=0, atol=1e-12)

    out = plot_domain_weights(log, tmp_path / "plots" / "weights.png", planted_quality={"a": 0.9, "b": 0.4})
    _assert_png(out)
    out = plot_domain_weights(log, tmp_path / "alpha.png", key="alpha", domain_names=["x", "y", "z"],
                              planted_quality=[0.1, 0.2, 0.3])
    _assert_png(out)
    _assert_png(plot_losses(log, tmp_path / "losses.png", log_scale=True))

    with pytest.raises(ValueError, match="planted_quality lacks domains \\['b'\\]"):
        plot_domain_weights(log, tmp_path / "x.png", planted_quality={"a": 0.9})
    with pytest.raises(ValueError, match="no record has a 'missing' field"):
        plot_domain_weights(log, tmp_path / "x.png", key="missing")
