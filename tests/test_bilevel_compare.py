"""experiments/compare_hypergradients.py end to end: a tiny run trained with checkpoints,
then two methods compared with exact at its start, middle and end."""

import json
import math
import os

import pytest

from dreamprm_jax.bilevel.compare import agreement
from dreamprm_jax.cli import compare_hypergradients
from dreamprm_jax.data import synthetic
from dreamprm_jax.train import hypergradient_audit
from tests.tiny_run import tiny_config, train


@pytest.fixture(scope="module")
def tiny_run(tiny_data, tmp_path_factory):
    """2 iterations of the tiny config, checkpoints at 1 and 2; the vanilla PRM (no hypergradient
    in training: the cheapest compile), whose parameters still move between checkpoints."""
    out = str(tmp_path_factory.mktemp("run"))
    train(tiny_config(tiny_data, out, iterations=2, checkpoint_every=1, keep_checkpoints=10, reweighting=False))
    return out


def test_cli_compares_at_initial_state_and_checkpoints(tiny_run, tmp_path):
    code = compare_hypergradients.main(["--run-dir", tiny_run, "--methods", "exact,darts", "--draws", "1",
                                        "--repeats", "1", "--out", str(tmp_path)])
    assert code == 0
    assert os.path.isfile(tmp_path / "hypergradient_audit.png")
    data = json.load(open(tmp_path / "hypergradient_audit.json"))
    assert data["trained_method"] == "exact" and data["unroll"] == 2 and len(data["domains"]) == len(synthetic.default_config().domains)
    assert [(c["step"], c["source"]) for c in data["checkpoints"]] == [(0, "initial"), (1, "checkpoint"),
                                                                       (2, "checkpoint")]
    for c in data["checkpoints"]:
        assert set(c["methods"]) == {"exact", "darts"}
        exact = c["methods"]["exact"]
        assert exact["rel_err"] == [0.0] and exact["sign_agree"] == [1.0]  # the reference itself, exactly
        assert abs(exact["cosine"][0] - 1.0) <= 1e-12, exact["cosine"]
        for m in c["methods"].values():
            assert m["finite"] == [True] and len(m["hypergradient"]) == 1 and len(m["hypergradient"][0]) == len(data["domains"])
            values = [m["cosine"][0], m["rel_err"][0], m["sign_agree"][0], m["time_s"], *m["hypergradient"][0]]
            assert all(math.isfinite(v) for v in values), values
            assert -1.0 - 1e-12 <= m["cosine"][0] <= 1.0 + 1e-12 and m["time_s"] > 0
    # the first draw at a checkpoint is the batch the run trained on next: the state moved between steps
    g = [c["methods"]["exact"]["hypergradient"][0] for c in data["checkpoints"]]
    assert g[0] != g[1] != g[2]


def test_missing_run_is_an_error_naming_the_directory(tmp_path, capsys):
    assert compare_hypergradients.main(["--run-dir", str(tmp_path / "nope")]) == 2
    assert "nope/checkpoints" in capsys.readouterr().err


def test_select_steps_nearest_to_quarters_with_the_initial_state():
    assert hypergradient_audit.select_steps([60, 120, 180, 240]) == [0, 60, 120, 240]
    assert hypergradient_audit.select_steps([100, 600]) == [0, 100, 600]  # 1/4 and 1/2 -> 100
    assert hypergradient_audit.select_steps([2, 4]) == [0, 2, 4]  # 1/4 = 1: a tie between 0 and 2 -> 0
    assert hypergradient_audit.select_steps([0, 5]) == [0, 5]


def test_agreement_metrics():
    a = agreement([1.0, -2.0, 0.5], [2.0, -4.0, -1.0])
    assert a.finite and a.sign_agree == pytest.approx(2 / 3, abs=1e-12)
    assert a.cosine == pytest.approx((2 + 8 - 0.5) / (21 ** 0.5 * 5.25 ** 0.5), rel=1e-12)
    assert a.rel_err == pytest.approx(((1 + 4 + 2.25) / 21) ** 0.5, rel=1e-12)
    assert not agreement([float("nan"), 1.0], [1.0, 1.0]).finite


@pytest.mark.parametrize("weighting", ["instance_table", "instance_net"])
def test_instance_runs_compare_on_their_upper_level_variable(tiny_data, tmp_path_factory, weighting):
    """One checkpoint of a run with instance weights: the table is compared on the entries
    its batches reach (saved as per-domain sums), the net on every parameter."""
    out = str(tmp_path_factory.mktemp(weighting))
    train(tiny_config(tiny_data, out, iterations=1, checkpoint_every=1, weighting=weighting, reweighting=False))
    audit = hypergradient_audit.audit_run(out, ["exact", "darts"], draws=1, repeats=1, steps=[1])
    assert audit.weighting == weighting and [c.step for c in audit.checkpoints] == [1]
    methods = audit.checkpoints[0].methods
    assert methods["exact"].rel_err == [0.0] and methods["exact"].sign_agree == [1.0]
    darts = methods["darts"]
    assert darts.finite == [True] and -1.0 <= darts.cosine[0] <= 1.0 and 0.0 <= darts.sign_agree[0] <= 1.0
    g = methods["exact"].hypergradient[0]
    if weighting == "instance_table":
        assert len(g) == len(audit.domains)  # per-domain sums of the [N] table's hypergradient
    else:
        assert len(g) == 16 * (len(audit.domains) + 3) + 1  # the net's parameters: h (K + 3) + 1
    assert any(v != 0.0 for v in g) and all(math.isfinite(v) for v in g)
    assert f"weighting {weighting}" in hypergradient_audit.format_audit(audit)
