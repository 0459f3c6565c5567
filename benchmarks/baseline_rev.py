"""``step_throughput --baseline-rev REV``: another git revision's bi-level steps beside the working
tree's, timed interleaved in one run.

    python -m benchmarks.step_throughput --baseline-rev 4ad48b9^1 --methods exact darts --repeats 10

REV is exported (``git archive``, tracked files only) into a temporary directory; two worker
processes (:mod:`benchmarks._step_worker`), one with ``PYTHONPATH`` on the export and one on the
working tree, each import only their own tree and build every ``--methods`` step with their own
``step_throughput._prepare_method`` on their own generated problem (the same options, parsed by
each tree's own parser; a problem option that the two trees resolve differently is an error).
They build one after the other, then the parent times the runs round-robin, one iteration of each
per round, every round in a fresh random order (``_common.time_interleaved(shuffle_seed=0)``: with
a fixed rotation each run always follows the same other run), asking one worker at a time while the other waits idle on its pipe;
each iteration is timed inside its worker.

Reported per method: median and spread ((max - min) / median) of each tree's iterations, the
ratio new / old as the median of the per-round ratios (``_common.paired_ratio``) and a
distribution-free confidence interval of that median (``_common.median_interval``, order
statistics of the per-round ratios): the two are equal within noise where it contains 1. The
first iteration's metrics of both trees (same weights, same batches) are printed beside them, and
whether the two trees lowered each step to the same program (a hash of its StableHLO text): where
they did, the times can differ only by noise, including a per-process offset (up to 10 % for
``darts`` on a loaded 2-core CPU, docs/performance.md) that the per-round pairing does not remove
and the interval does not hold.

Limits: REV's ``benchmarks/step_throughput.py`` must have the pieces the worker calls
(``_parser``, ``_defaults``, ``_model_config``, ``_spec``, ``_jax_setup``, ``_prepare_method``:
the layout since step_throughput times its runs round-robin); an older one is refused by name.
REV is its committed files; the new side is the working tree as it is, uncommitted changes
included. Both processes hold their compiled steps and states at once (as ``--interleave`` does
in one process).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile

from benchmarks import _common

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_step_worker.py")
# step_throughput options that do not define the problem (timing, torch, output): not compared
NOT_PROBLEM = frozenset({"warmup", "repeats", "interleave", "no_inner_step", "torch", "torch_threads",
                         "peak_tflops", "out", "baseline_rev"})


def split_baseline_argv(argv: list[str]) -> tuple[str | None, list[str]]:
    """``(REV, the other options)`` of a ``step_throughput`` command line: the other options go to
    both trees' parsers, which may not know ``--baseline-rev``."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--baseline-rev", default=None)
    known, rest = p.parse_known_args(argv)
    return known.baseline_rev, rest


def export_revision(repo: str, rev: str, dest: str) -> str:
    """The tracked files of ``rev`` (of the git repository at ``repo``) written under ``dest``;
    returns the commit's full hash."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--verify", f"{rev}^{{commit}}"], cwd=repo, check=True,
                                capture_output=True, text=True).stdout.strip()
    except subprocess.CalledProcessError as e:
        raise SystemExit(f"--baseline-rev {rev}: not a commit of the repository at {repo} ({e.stderr.strip()})")
    tar = subprocess.run(["git", "archive", "--format=tar", commit], cwd=repo, check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as f:
        f.extractall(dest, filter="data")
    return commit


def describe_tree(repo: str) -> str:
    """``HASH`` or ``HASH-dirty`` of the working tree."""
    return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=repo, check=True, capture_output=True,
                          text=True).stdout.strip()


class Worker:
    """A ``_step_worker`` process over the tree at ``root``; :meth:`call` times one iteration."""

    def __init__(self, label: str, root: str, argv: list[str]):
        self.label, self.root = label, root
        env = {**os.environ, "PYTHONPATH": root}
        self.proc = subprocess.Popen([sys.executable, "-P", WORKER, label, *argv], cwd=root, env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.ready = self._read()
        package = os.path.realpath(self.ready["package"])
        if not package.startswith(os.path.realpath(root) + os.sep):
            self.close()
            raise SystemExit(f"{label} tree {root}: imported dreamprm_jax from {package}, expected the tree's own")

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"{self.label} tree {self.root}: the worker ended (exit {self.proc.wait()}), "
                             "see its messages above")
        msg = json.loads(line)
        if "error" in msg:
            raise SystemExit(f"{self.label} tree {self.root}: {msg['error']}\n{msg.get('traceback', '')}")
        return msg

    def request(self, line: str) -> dict:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self._read()

    def call(self, method: str) -> float:
        return self.request(f"call {method}")["s"]

    def close(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
            except OSError:
                pass
            self.proc.wait()


def problem_mismatch(old: dict, new: dict) -> list[str]:
    """Problem options (``step_throughput``'s resolved arguments) the two trees resolve differently."""
    return [f"--{k.replace('_', '-')}: old {old[k]!r}, new {new[k]!r}" for k in sorted(set(old) & set(new))
            if k not in NOT_PROBLEM and old[k] != new[k]]


def compare(timings: dict[str, dict], methods: list[str], level: float = 0.95) -> dict[str, dict]:
    """Per method: both trees' timings and ``ratio`` (median over rounds of new / old) with
    ``interval`` / ``coverage`` (``_common.median_interval`` of the per-round ratios)."""
    out = {}
    for m in methods:
        old, new = timings[f"old {m}"], timings[f"new {m}"]
        per_round = [n / o for n, o in zip(new["times_s"], old["times_s"])]
        lo, hi, coverage = _common.median_interval(per_round, level)
        out[m] = {"old": old, "new": new, "ratio": _common.paired_ratio(new, old), "interval": [lo, hi],
                  "coverage": coverage, "per_round_ratios": per_round}
    return out


def same_program(old: dict, new: dict) -> dict[str, bool | None]:
    """Per method of the workers' records: whether both trees lowered the same program (``None``:
    a tree gave no hash)."""
    return {m: (None if not (old[m].get("program_sha256") and new.get(m, {}).get("program_sha256"))
                else old[m]["program_sha256"] == new[m]["program_sha256"]) for m in old}


def format_table(rows: dict[str, dict], compile_s: dict[str, dict] | None = None,
                 same: dict[str, bool | None] | None = None) -> str:
    """The side-by-side table of :func:`compare`'s rows (``compile_s[tree][method]`` and
    :func:`same_program`'s answers optional)."""
    lines = [f"{'method':<14} {'old ms':>9} {'spread %':>8} {'new ms':>9} {'spread %':>8} {'new/old':>8} "
             f"{'interval':>15} {'coverage':>8}" + (f" {'same program':>12}" if same else "")
             + (f" {'compile old/new s':>18}" if compile_s else "")]
    for m, r in rows.items():
        lo, hi = r["interval"]
        line = (f"{m:<14} {1e3 * r['old']['median_s']:9.1f} {r['old']['spread_pct']:8.1f} "
                f"{1e3 * r['new']['median_s']:9.1f} {r['new']['spread_pct']:8.1f} {r['ratio']:8.3f} "
                f"{f'[{lo:.3f}, {hi:.3f}]':>15} {100 * r['coverage']:7.1f}%")
        if same:
            line += f" {({True: 'yes', False: 'no', None: 'n/a'})[same.get(m)]:>12}"
        if compile_s:
            line += f" {compile_s['old'][m]:>10.1f} / {compile_s['new'][m]:.1f}"
        lines.append(line)
    return "\n".join(lines)


def main(a, rest: list[str]) -> dict:
    """Run ``step_throughput``'s options ``rest`` on ``a.baseline_rev`` and the working tree
    (``a``: the parsed options, for the methods and the timing rounds)."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tmp = tempfile.mkdtemp(prefix="step_baseline_")
    workers = {}
    try:
        commit = export_revision(repo, a.baseline_rev, os.path.join(tmp, "tree"))
        new_desc = describe_tree(repo)
        print(f"[step_throughput] old = {a.baseline_rev} ({commit[:12]}, exported to {tmp}), new = the working "
              f"tree {repo} ({new_desc}); building old, then new", flush=True)
        workers["old"] = Worker("old", os.path.join(tmp, "tree"), rest)
        workers["new"] = Worker("new", repo, rest)
        bad = problem_mismatch(workers["old"].ready["args"], workers["new"].ready["args"])
        if bad:
            raise SystemExit("the two trees resolve the problem differently; pass these options explicitly: "
                             + "; ".join(bad))
        elapsed = [0.0]  # the clock of time_interleaved: seconds measured inside the workers

        def timed(worker, method):
            def fn():
                elapsed[0] += worker.call(method)
            return fn

        fns = {f"{tree} {m}": timed(workers[tree], m) for m in a.methods for tree in ("old", "new")}
        print(f"  timing {len(fns)} runs round-robin across the two processes: {a.warmup} warm-up + {a.repeats} "
              "timed rounds, each in a random order", flush=True)
        timings = _common.time_interleaved(fns, a.warmup, a.repeats, clock=lambda: elapsed[0], shuffle_seed=0)
        first = {tree: w.request("report")["first_metrics"] for tree, w in workers.items()}
    finally:
        for w in workers.values():
            w.close()
        shutil.rmtree(tmp, ignore_errors=True)

    rows = compare(timings, a.methods)
    same = same_program(workers["old"].ready["records"], workers["new"].ready["records"])
    for m in rows:
        rows[m]["same_program"] = same.get(m)
    compile_s = {tree: {m: r["compile_s"] for m, r in w.ready["records"].items()} for tree, w in workers.items()}
    ready = workers["new"].ready
    args = ready["args"]
    print()
    print(f"{args['config']} on {ready['device']}: B={args['batch']} L={args['seq_len']} T={args['unroll']} "
          f"meta {args['meta_chains']}x{args['meta_steps']} image {args['image_side']}px, dtype {args['dtype']}; "
          f"old = {a.baseline_rev} ({commit[:12]}), new = {new_desc}; {a.repeats} interleaved rounds")
    print(format_table(rows, compile_s, same))
    coverage = {f"{100 * r['coverage']:.1f}%" for r in rows.values()}
    print(f"(ms: median of the rounds, spread: (max - min) / median; new/old: median of the per-round ratios; "
          f"interval: distribution-free confidence interval of that median ({', '.join(sorted(coverage))} "
          "coverage, order statistics of the per-round ratios); equal within noise where it contains 1; same "
          "program: both trees lowered the step to the same StableHLO text, so only noise can part their times, "
          "including each process's own offset, which the interval does not hold)")
    for m in a.methods:
        print(f"  first iteration {m}: " + "; ".join(
            f"{k} old {first['old'][m][k]:.6g} new {first['new'][m][k]:.6g}"
            for k in ("meta_loss", "hypergrad_norm") if k in first["old"].get(m, {}) and k in first["new"].get(m, {})))
    load = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    if load:
        print(f"load average at the end (1/5/15 min): {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} on "
              f"{os.cpu_count()} cores")
    result = {"benchmark": "step_throughput_baseline", "baseline_rev": a.baseline_rev, "baseline_commit": commit,
              "new_tree": new_desc, "args": args, "device": ready["device"], "compile_s": compile_s,
              "methods": rows, "first_metrics": first, "load_average_1_5_15_end": load}
    print(f"wrote {_common.write_json(a.out, result)}")
    return result
