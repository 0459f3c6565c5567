"""Where the time of a PRM forward / backward / bi-level iteration goes, per XLA op (XLA:CPU or any backend).

    python -m benchmarks.profile_backward                               # jax.grad of the inner loss, B=16 L=112
    python -m benchmarks.profile_backward --target forward
    python -m benchmarks.profile_backward --target step --method exact --batch 8 --seq-len 64
    python -m benchmarks.profile_backward --target grad --top 60 --hlo /tmp/grad.hlo
    python -m benchmarks.profile_backward --target step --method exact --by-line   # time per source line

What it does: builds the demo PRM and one generated training batch (``benchmarks._common``,
the trainer's layout: left-padded rows, one image each), compiles the target, runs it a few
times untimed, then ``--calls`` times under ``jax.profiler`` and reads the trace back with
``jax.profiler.ProfileData``. Every leaf op event (XLA fusions, dots, copies; loop and call
wrappers are skipped so nothing is counted twice) is summed per HLO instruction name and
joined with the compiled HLO's ``op_name`` metadata, so each line says which JAX operation
(``jvp()`` = forward, ``transpose(jvp())`` = backward) the instruction came from.
``--by-line`` sums instead per Python source line (the innermost stack frame XLA recorded for
the instruction; a custom VJP's backward pass is charged to the line that called the function),
``--by-count`` lists the most executed instructions (at small sizes the op count, not the
FLOPs, sets the time).

Targets: ``forward`` (the inner loss), ``grad`` (``jax.grad`` of the inner loss w.r.t. all PRM
parameters), ``step`` (one jitted bi-level iteration, ``train.step.make_bilevel_step``, with
``--method``).

Times are summed over the threads of XLA's pool (so they can exceed the wall time) and, on a
shared machine, include time the threads were descheduled: read the ranking, not the digits.
The wall-clock median of the same calls is printed too. For A/B timings of two formulations
measure them side by side in one process (interleaved repetitions), not across runs.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import shutil
import tempfile


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile_backward", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--target", choices=("forward", "grad", "step"), default="grad")
    p.add_argument("--method", default="exact", help="--target step: hypergradient method ('none': no reweighting)")
    p.add_argument("--hidden", type=int, default=64, help="demo text hidden size")
    p.add_argument("--layers", type=int, default=2, help="demo decoder layers")
    p.add_argument("--batch", type=int, default=16, help="training rows B")
    p.add_argument("--seq-len", type=int, default=112, help="training bucket L")
    p.add_argument("--image-side", type=int, default=56, help="image side px, one image per row (0: text only)")
    p.add_argument("--unroll", type=int, default=5, help="--target step: T inner steps")
    p.add_argument("--remat", default="none", help="per-block remat policy")
    p.add_argument("--pack-meta", action=argparse.BooleanOptionalAction, default=True,
                   help="--target step: one packed meta row per chain (the trainer's default), or one row per prefix")
    p.add_argument("--by-count", action="store_true", help="list the most executed instructions, not the slowest")
    p.add_argument("--by-line", action="store_true",
                   help="sum the time per Python source line (the innermost frame that emitted each instruction)")
    p.add_argument("--calls", type=int, default=10, help="profiled calls")
    p.add_argument("--top", type=int, default=40, help="ops listed")
    p.add_argument("--hlo", default=None, help="also write the optimised HLO text here")
    return p


def _build(a):
    """``(fn, args)``: the jitted target and its (device) arguments."""
    import jax
    import jax.numpy as jnp

    from benchmarks import _common
    from dreamprm_jax.models import prm, qwen2_vl
    from dreamprm_jax.train import step as step_lib

    config = qwen2_vl.demo(hidden_size=a.hidden, num_hidden_layers=a.layers, remat=a.remat)
    spec = _common.ProblemSpec(batch=a.batch, seq_len=a.seq_len, unroll=a.unroll if a.target == "step" else 1,
                               image_side=a.image_side)
    problem = _common.make_problem(config, spec)
    params = prm.init(config, jax.random.key(0))
    inner_loss, _ = step_lib.make_losses(config, "mean")
    raw = jnp.zeros((spec.num_domains,), jnp.float32)
    if a.target in ("forward", "grad"):
        batch = jax.tree.map(lambda x: jnp.asarray(x[0]), problem["inner_jax"])
        loss = lambda p, b: inner_loss(p, raw, b)  # noqa: E731
        fn = jax.jit(loss if a.target == "forward" else jax.grad(loss))
        return fn, (params, batch)
    opt = step_lib.inner_optimizer(2e-3, 5000, 0.5, 0.01)
    meta_opt = step_lib.meta_optimizer(0.01, 1e-3)
    step = step_lib.make_bilevel_step(config, opt, meta_opt, method="exact" if a.method == "none" else a.method,
                                      reweighting=a.method != "none")
    state = step_lib.init_state(params, spec.num_domains, opt, meta_opt)
    inner = jax.tree.map(jnp.asarray, problem["inner_jax"])
    meta = jax.tree.map(jnp.asarray, problem["meta_jax_packed" if a.pack_meta else "meta_jax"])
    fn = jax.jit(lambda s, i, m: step(s, i, m)[1])  # metrics only: the state is not threaded (same work each call)
    return fn, (state, inner, meta)


def _op_names(hlo: str) -> dict[str, tuple[str, str]]:
    """HLO instruction name -> (result shape, JAX op_name metadata)."""
    out = {}
    for m in re.finditer(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\S+) .*?op_name=\"([^\"]*)\"", hlo, re.M):
        out[m.group(1)] = (m.group(2), m.group(3))
    return out


def _source_lines(hlo: str) -> dict[str, str]:
    """HLO instruction name -> ``file.py:line function`` of the innermost Python frame that emitted it
    (the module's ``StackFrames`` tables; fusions carry their root op's frame)."""
    sections: dict[str, dict[int, str]] = {}
    current = None
    for line in hlo.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            current = sections.setdefault(line, {})
            continue
        m = re.match(r"^(\d+) (.*)$", line)
        if current is not None and m:
            current[int(m.group(1))] = m.group(2)
        else:  # a table ends at its first line that is not "<id> <entry>"
            current = None
    files, funcs = sections.get("FileNames", {}), sections.get("FunctionNames", {})
    where = {}
    for i, loc in sections.get("FileLocations", {}).items():
        f = re.search(r"file_name_id=(\d+) function_name_id=(\d+) line=(\d+)", loc)
        if f:
            path = files.get(int(f.group(1)), "?").strip('"')
            func = funcs.get(int(f.group(2)), "?").strip('"').split(".")[-1]
            where[i] = f"{os.path.basename(path)}:{f.group(3)} {func}"
    frames = {}
    for i, fr in sections.get("StackFrames", {}).items():
        f = re.search(r"file_location_id=(\d+)", fr)
        if f:
            frames[i] = where.get(int(f.group(1)), "?")
    out = {}
    for m in re.finditer(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?stack_frame_id=(\d+)", hlo, re.M):
        out[m.group(1)] = frames.get(int(m.group(2)), "?")
    return out


def _short(op: str) -> str:
    for a, b in (("transpose(jvp())", "BWD"), ("jvp()", "FWD"), ("while/body/", ""), ("closed_call/", ""),
                 ("checkpoint/", "")):
        op = op.replace(a, b)
    return re.sub(r"jit\(<lambda>\)/|jit\(step\)/", "", op)


def main(argv=None) -> int:
    a = _parser().parse_args(argv)
    import jax

    from benchmarks import _common

    fn, args = _build(a)
    compiled = fn.lower(*args).compile()
    hlo = compiled.as_text()
    if a.hlo:
        with open(a.hlo, "w", encoding="utf-8") as f:
            f.write(hlo)
    names = _op_names(hlo)
    wall = _common.time_calls(lambda: jax.block_until_ready(compiled(*args)), 3, a.calls)
    trace_dir = tempfile.mkdtemp(prefix="profile_backward_")
    try:
        jax.profiler.start_trace(trace_dir)
        for _ in range(a.calls):
            jax.block_until_ready(compiled(*args))
        jax.profiler.stop_trace()
        files = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
        data = jax.profiler.ProfileData.from_file(files[-1])
    finally:
        shutil.rmtree(trace_dir, ignore_errors=True)
    total, count = collections.Counter(), collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            if line.name == "python":
                continue
            for ev in line.events:
                if ("Thunk" in ev.name or "ThreadPool" in ev.name or "Threadpool" in ev.name
                        or ev.name.startswith(("while", "call", "conditional", "end: "))):
                    continue
                total[ev.name] += ev.duration_ns
                count[ev.name] += 1
    n = a.calls
    ops = sum(total.values()) / 1e6 / n
    print(f"[profile_backward] target {a.target}{' ' + a.method if a.target == 'step' else ''}, B={a.batch} "
          f"L={a.seq_len} image {a.image_side}px, hidden {a.hidden}, {a.layers} layers on {jax.devices()[0]}")
    print(f"wall median {1e3 * wall['median_s']:.2f} ms/call; leaf op time {ops:.2f} ms/call "
          f"(summed over threads) in {sum(count.values()) / n:.0f} op executions per call")
    by_kind = collections.Counter()
    for k, v in total.items():
        op = names.get(k, ("", ""))[1]
        by_kind["backward" if "transpose(jvp" in op else "forward" if "jvp(" in op else "other"] += v
    print("by pass: " + ", ".join(f"{k} {v / 1e6 / n:.2f} ms" for k, v in by_kind.most_common()))
    if a.by_line:
        lines = _source_lines(hlo)
        per_line, runs = collections.Counter(), collections.Counter()
        for k, v in total.items():
            per_line[lines.get(k, "?")] += v
            runs[lines.get(k, "?")] += count[k]
        print(f"{'ms/call':>8} {'ops':>6}  source line (innermost frame)")
        for k, v in per_line.most_common(a.top):
            print(f"{v / 1e6 / n:8.3f} {runs[k] / n:6.0f}  {k}")
        return 0
    print(f"{'ms/call':>8} {'x':>4}  {'instruction':<40} {'shape':<36} jax op")
    for k, v in (sorted(total.items(), key=lambda kv: -count[kv[0]])[:a.top] if a.by_count
                 else total.most_common(a.top)):
        shape, op = names.get(k, ("?", "?"))
        print(f"{v / 1e6 / n:8.3f} {count[k] / n:4.0f}  {k[:40]:<40} {shape[:36]:<36} {_short(op)[:100]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
