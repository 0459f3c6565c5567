"""The benchmarks' interleaved timing: round-robin order, paired per-round ratios, and the
step_throughput CLI end to end on a tiny config (both timing orders, with the torch reference).

A fake clock stands in for ``time.perf_counter`` where only the bookkeeping is tested (no sleeps).
"""

import json

import pytest

from benchmarks import _common


class FakeClock:
    """Each run advances the clock by its own cost times the current 'load' (which the test changes)."""

    def __init__(self):
        self.now = 0.0
        self.load = 1.0
        self.calls = []

    def __call__(self):
        return self.now

    def run(self, name, cost):
        def fn():
            self.calls.append(name)
            self.now += cost * self.load
        return fn


def test_rounds_rotate_the_order_and_pair_the_times():
    clock = FakeClock()
    fns = {"a": clock.run("a", 3.0), "b": clock.run("b", 1.0), "c": clock.run("c", 2.0)}
    out = _common.time_interleaved(fns, warmup=1, repeats=4, clock=clock)
    # warm-up round in the given order, then rounds rotated by 0, 1, 2, 0
    assert clock.calls == list("abc") + list("abc") + list("bca") + list("cab") + list("abc")
    assert out["a"]["times_s"] == [3.0] * 4 and out["b"]["median_s"] == 1.0
    assert _common.paired_ratio(out["a"], out["b"]) == pytest.approx(3.0)


def test_shuffled_rounds_call_every_run_once_in_varying_orders():
    clock = FakeClock()
    fns = {n: clock.run(n, 1.0) for n in "abcd"}
    out = _common.time_interleaved(fns, warmup=0, repeats=12, clock=clock, shuffle_seed=0)
    rounds = ["".join(clock.calls[4 * r:4 * r + 4]) for r in range(12)]
    assert all(sorted(r) == list("abcd") for r in rounds)
    assert len(set(rounds)) > 4 and all(len(out[n]["times_s"]) == 12 for n in "abcd")
    assert {r[r.index("b") - 1] for r in rounds if r[0] != "b"} == set("acd")  # b's predecessor varies


def test_paired_ratio_is_exact_when_the_load_changes_between_rounds():
    clock = FakeClock()
    rounds = {"n": 0}

    def loaded(fn):  # the load is 1 or 3, switching every round (2 calls per round)
        def g():
            clock.load = 3.0 if (rounds["n"] // 2) % 2 else 1.0
            rounds["n"] += 1
            fn()
        return g

    out = _common.time_interleaved({"a": loaded(clock.run("a", 2.0)), "b": loaded(clock.run("b", 1.0))},
                                   warmup=0, repeats=6, clock=clock)
    assert sorted(set(out["a"]["times_s"])) == [2.0, 6.0]  # the load did reach the timings
    assert _common.paired_ratio(out["a"], out["b"]) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="rounds"):
        _common.paired_ratio(out["a"], {"times_s": [1.0]})


@pytest.mark.parametrize("interleave", [True, False])
def test_step_throughput_cli_times_every_run(tmp_path, interleave):
    from benchmarks import step_throughput

    out = tmp_path / "st.json"
    args = ["--hidden", "16", "--layers", "1", "--batch", "2", "--seq-len", "40", "--unroll", "2",
            "--meta-chains", "2", "--meta-steps", "2", "--methods", "none", "--torch", "--torch-threads", "1",
            "--warmup", "0", "--repeats", "2", "--out", str(out),
            "--interleave" if interleave else "--no-interleave"]
    result = step_throughput.main(args)
    saved = json.loads(out.read_text())
    assert saved["interleaved"] is interleave and result["interleaved"] is interleave
    for run in (saved["jax"]["none"], saved["jax"]["inner_step"], saved["torch"]["darts_threads1"]["iteration"],
                saved["torch"]["darts_threads1"]["inner_step"]):
        assert len(run["times_s"]) == 2 and run["median_s"] > 0
    ratios = saved["ratios"]
    assert ratios["ratio_statistic"] == ("median of per-round ratios" if interleave else "ratio of medians")
    assert ratios["speedup_jax_none_vs_torch_darts"] > 0
    assert saved["jax"]["none"]["first_metrics"]["meta_loss"] > 0
    assert len(saved["versions"]["load_average_1_5_15_end"]) == 3  # saved, not only printed


def test_step_throughput_weighting_options_and_ratios_over_the_domain_run():
    from argparse import Namespace

    from benchmarks import step_throughput

    parse = step_throughput._parser().parse_args
    assert parse([]).weighting == ["domain"] and parse([]).num_records == 100_000
    several = parse(["--weighting", "domain", "instance_net", "--num-records", "7"])
    assert (several.weighting, several.num_records) == (["domain", "instance_net"], 7)
    with pytest.raises(SystemExit):
        parse(["--weighting", "per_step"])
    assert step_throughput.run_name("exact:mixed", "domain") == "exact:mixed"
    assert step_throughput.run_name("darts", "instance_table") == "darts/instance_table"
    run = {"median_s": 1.0, "times_s": [1.0, 2.0]}
    result = {"interleaved": True, "torch": {},
              "jax": {"darts": run, "exact": {"median_s": 2.0, "times_s": [2.0, 4.0]},
                      "exact/instance_table": {"median_s": 3.0, "times_s": [3.0, 6.0]}}}
    a = Namespace(methods=["exact", "darts"], weighting=["domain", "instance_table"])
    ratios = step_throughput._ratios(result, a)
    assert ratios["time_ratio_jax_exact/instance_table_over_jax_exact"] == pytest.approx(1.5)
    assert ratios["time_ratio_jax_exact_over_jax_darts"] == pytest.approx(2.0)
    assert not any("instance_table_over_jax_darts" in k for k in ratios)


def test_step_throughput_cli_times_an_instance_table_run(tmp_path):
    from benchmarks import step_throughput

    out = tmp_path / "st.json"
    step_throughput.main(["--hidden", "16", "--layers", "1", "--batch", "2", "--seq-len", "40", "--unroll", "2",
                          "--meta-chains", "2", "--meta-steps", "2", "--methods", "none", "--no-torch",
                          "--no-inner-step", "--weighting", "instance_table", "--num-records", "50", "--warmup", "0",
                          "--repeats", "2", "--out", str(out)])
    saved = json.loads(out.read_text())
    run = saved["jax"]["none/instance_table"]
    assert len(run["times_s"]) == 2 and run["median_s"] > 0
    assert run["first_metrics"]["meta_loss"] > 0 and "instance_weights" not in run["first_metrics"]
    assert list(saved["jax"]) == ["none/instance_table"]
