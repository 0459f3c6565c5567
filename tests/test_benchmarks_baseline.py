"""``step_throughput --baseline-rev``: option splitting, the revision export, the worker protocol on a
stand-in tree, the median's confidence interval and the side-by-side table (nothing timed)."""

import os
import subprocess
import textwrap

import pytest

from benchmarks import _common, baseline_rev


def test_split_baseline_argv_keeps_the_other_options_in_order():
    rev, rest = baseline_rev.split_baseline_argv(["--methods", "exact", "darts", "--baseline-rev", "abc^1",
                                                  "--repeats", "3"])
    assert rev == "abc^1" and rest == ["--methods", "exact", "darts", "--repeats", "3"]
    rev, rest = baseline_rev.split_baseline_argv(["--baseline-rev=HEAD~2", "--hidden", "16"])
    assert rev == "HEAD~2" and rest == ["--hidden", "16"]
    assert baseline_rev.split_baseline_argv(["--hidden", "16"]) == (None, ["--hidden", "16"])


def test_method_specs_carry_options():
    from benchmarks.step_throughput import _split_method

    assert _split_method("darts") == ("darts", {})
    assert _split_method("exact:mixed") == ("exact", {"second_order": "mixed"})
    assert _split_method("exact_reversible:in_place=true") == ("exact_reversible", {"in_place": True})
    assert _split_method("truncated:reverse,k=2") == ("truncated", {"second_order": "reverse", "k": 2})


def test_step_throughput_parses_the_option_and_names_its_own_output():
    from benchmarks import step_throughput as st

    a = st._defaults(st._parser().parse_args(["--baseline-rev", "HEAD", "--methods", "darts"]))
    assert a.baseline_rev == "HEAD" and a.out.endswith("step_throughput_baseline.json")
    assert st._defaults(st._parser().parse_args([])).out.endswith(os.path.join("results", "step_throughput.json"))


@pytest.mark.parametrize("n, k, coverage", [(5, 1, 1 - 2 / 32), (6, 1, 1 - 2 / 64), (8, 1, 1 - 2 / 256),
                                            (10, 2, 1 - 2 * 11 / 1024), (15, 4, 1 - 2 * 576 / 32768)])
def test_median_interval_takes_the_widest_order_statistics_that_reach_the_level(n, k, coverage):
    values = [float(v) for v in range(n, 0, -1)]  # unsorted on purpose
    lo, hi, cov = _common.median_interval(values, 0.95)
    assert (lo, hi) == (k, n + 1 - k)
    assert cov == pytest.approx(coverage, rel=1e-12)
    assert cov >= 0.95 or k == 1  # below the level only where the range itself is short of it
    with pytest.raises(ValueError, match="no values"):
        _common.median_interval([])


def _timing(times):
    return _common.summarize_times(times)


def test_compare_pairs_rounds_and_the_table_shows_both_trees():
    timings = {"old exact": _timing([1.0, 2.0, 1.0, 1.0, 1.0, 1.0]),
               "new exact": _timing([1.1, 2.2, 1.1, 1.1, 1.1, 1.1]),
               "old darts": _timing([0.5, 0.5, 0.6, 0.5, 0.4, 0.5]),
               "new darts": _timing([0.5, 0.6, 0.5, 0.5, 0.5, 0.4])}
    rows = baseline_rev.compare(timings, ["exact", "darts"])
    assert rows["exact"]["ratio"] == pytest.approx(1.1)  # the load doubling in round 2 cancels
    assert rows["exact"]["interval"] == pytest.approx([1.1, 1.1])
    lo, hi = rows["darts"]["interval"]
    assert lo < 1.0 < hi and rows["darts"]["coverage"] == pytest.approx(1 - 2 / 64)
    table = baseline_rev.format_table(rows, {"old": {"exact": 30.0, "darts": 20.0},
                                             "new": {"exact": 31.0, "darts": 19.0}}).splitlines()
    assert table[0].split()[:6] == ["method", "old", "ms", "spread", "%", "new"]
    exact = table[1].split()
    assert exact[0] == "exact" and exact[1] == "1000.0" and exact[3] == "1100.0" and exact[5] == "1.100"
    assert "[0.800, 1.250]" in table[2] and table[1].endswith("30.0 / 31.0")
    same = baseline_rev.same_program({"exact": {"program_sha256": "a"}, "darts": {"program_sha256": "b"}},
                                     {"exact": {"program_sha256": "a"}, "darts": {"program_sha256": "c"}})
    assert same == {"exact": True, "darts": False}
    assert baseline_rev.same_program({"none": {"program_sha256": None}}, {"none": {"program_sha256": "a"}}) == {
        "none": None}
    table = baseline_rev.format_table(rows, same={"exact": True, "darts": None}).splitlines()
    assert "same program" in table[0] and table[1].endswith(" yes") and table[2].endswith(" n/a")


def test_problem_mismatch_names_the_options_and_ignores_timing_ones():
    old = {"batch": 8, "seq_len": 64, "repeats": 5, "only_old": 1}
    new = {"batch": 8, "seq_len": 128, "repeats": 15, "only_new": 2}
    assert baseline_rev.problem_mismatch(old, new) == ["--seq-len: old 64, new 128"]


def _git(repo, *args):
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True,
                   env={**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                        "GIT_COMMITTER_EMAIL": "t@t"})


def test_export_revision_writes_that_commits_tracked_files(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "a.txt").write_text("first\n")
    _git(repo, "add", "a.txt")
    _git(repo, "commit", "-qm", "one")
    (repo / "a.txt").write_text("second\n")
    (repo / "untracked.txt").write_text("x\n")
    _git(repo, "commit", "-qam", "two")
    commit = baseline_rev.export_revision(str(repo), "HEAD^", str(tmp_path / "out"))
    assert len(commit) == 40
    assert (tmp_path / "out" / "a.txt").read_text() == "first\n"
    assert not (tmp_path / "out" / "untracked.txt").exists()
    with pytest.raises(SystemExit, match="not a commit"):
        baseline_rev.export_revision(str(repo), "no-such-rev", str(tmp_path / "out2"))


# A stand-in tree: its step_throughput has the pieces the worker uses, its "steps" cost nothing.
FAKE_STEP_THROUGHPUT = '''
import argparse
import numpy as np


def _parser():
    p = argparse.ArgumentParser()
    p.add_argument("--methods", nargs="+", default=["darts"])
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--device", default="default")
    p.add_argument("--pack-meta", action="store_true")
    return p


def _defaults(a):
    a.batch = BATCH if a.batch is None else a.batch
    return a


def _model_config(a):
    return None


def _spec(a, config):
    return a.batch


def _jax_setup(a, config):
    return None, None, None, 0, 0.0


def _prepare_method(a, config, method, make_params, opt, meta_opt, inner, meta):
    if method == "broken":
        raise ValueError("cannot build broken")
    first = {}
    def call():
        first.setdefault("meta_loss", 0.25)
    return {"trace_s": 0.0, "compile_s": 0.5, "first_metrics": first}, call
'''
FAKE_COMMON = '''
import numpy as np


def make_problem(config, spec):
    return {"inner_jax": np.zeros(spec), "meta_jax": np.zeros(1), "meta_jax_packed": np.zeros(1)}
'''


def _fake_tree(root, batch=8):
    for pkg in ("dreamprm_jax", "benchmarks"):
        os.makedirs(root / pkg)
        (root / pkg / "__init__.py").write_text("")
    (root / "benchmarks" / "step_throughput.py").write_text(textwrap.dedent(FAKE_STEP_THROUGHPUT).replace(
        "BATCH", str(batch)))
    (root / "benchmarks" / "_common.py").write_text(textwrap.dedent(FAKE_COMMON))
    return str(root)


def test_worker_builds_its_own_tree_and_answers_calls(tmp_path):
    root = _fake_tree(tmp_path / "tree")
    w = baseline_rev.Worker("old", root, ["--methods", "darts", "none"])
    try:
        assert os.path.realpath(w.ready["package"]) == os.path.realpath(os.path.join(root, "dreamprm_jax"))
        assert w.ready["args"]["batch"] == 8 and w.ready["records"]["none"]["compile_s"] == 0.5
        assert w.ready["records"]["none"]["program_sha256"] is None  # the stand-in has no train.step
        assert w.call("darts") >= 0.0
        assert w.request("report")["first_metrics"] == {"darts": {"meta_loss": 0.25}, "none": {}}
        with pytest.raises(SystemExit, match="old tree .*unknown request"):
            w.request("sing")
    finally:
        w.close()
    assert w.proc.returncode == 0


def test_worker_errors_name_the_tree(tmp_path):
    root = _fake_tree(tmp_path / "tree")
    with pytest.raises(SystemExit, match=r"old tree .*tree: ValueError: cannot build broken"):
        baseline_rev.Worker("old", root, ["--methods", "broken"])
    os.remove(os.path.join(root, "benchmarks", "step_throughput.py"))
    with open(os.path.join(root, "benchmarks", "step_throughput.py"), "w") as f:
        f.write("def _parser():\n    pass\n")
    with pytest.raises(SystemExit, match="lacks _defaults, _model_config"):
        baseline_rev.Worker("new", root, [])
