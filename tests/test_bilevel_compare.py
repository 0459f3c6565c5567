"""Smoke test of the compare-hypergradients CLI and the problem registry."""

import json
import os

import pytest

from dreamprm_jax.bilevel import problems
from dreamprm_jax.cli import compare_hypergradients


def test_cli_writes_json_and_png(tmp_path):
    out = compare_hypergradients.main([
        "--model", "mlp", "--methods", "exact,darts", "--states", "1", "--draws", "1", "--inner-steps", "2",
        "--num-domains", "2", "--repeats", "1", "--out", str(tmp_path)])
    data = json.load(open(tmp_path / "compare_mlp.json"))
    assert os.path.exists(tmp_path / "compare_mlp.png")
    assert set(data["methods"]) == {"exact", "darts"} and data["exact_over_darts_time"] > 0
    exact = data["methods"]["exact"]["summary"]
    assert exact["cosine_mean"] >= 1 - 1e-6 and exact["rel_err_median"] == 0.0  # the reference itself
    assert "temp_size_in_bytes" in data["methods"]["exact"]["memory"]
    assert out["methods"]["darts"]["summary"]["finite_fraction"] == 1.0


def test_problem_registry():
    assert {"mlp", "tiny_transformer", "quadratic"} <= set(problems.available_problems())
    prob = problems.get_problem("dreamprm_jax.bilevel.problems:quadratic", num_domains=2)
    assert prob.alpha.shape == (2,)
    with pytest.raises(ValueError, match="unknown problem"):
        problems.get_problem("nope")
