"""One tree's bi-level steps, built once and timed on request: the subprocess of
``benchmarks.step_throughput --baseline-rev`` (see :mod:`benchmarks.baseline_rev`).

Run as a script (``python -P _step_worker.py LABEL ARGS``) with ``PYTHONPATH`` set to the tree under
test, it imports only that tree's ``benchmarks.step_throughput`` and builds every method with
the tree's own ``_prepare_method`` (trace + compile + a fresh state) on the tree's own
``_common.make_problem``, exactly as that tree's benchmark does. ``ARGS`` are
``step_throughput`` options, parsed by that tree's parser.

Protocol (one JSON object per line; the worker's stdout and C-level writes go to stderr, the
replies to the original stdout):

* worker: ``{"ready": ..., "package": ..., "args": {...}, "records": {method: {...}}}`` once built
  (a record: ``trace_s``, ``compile_s``, ``program_sha256``, the hash of the step's lowered
  program);
* parent ``call METHOD`` -> worker ``{"s": seconds}`` (one iteration on the method's threaded
  state, ``block_until_ready``, timed here with ``time.perf_counter``);
* parent ``report`` -> worker ``{"first_metrics": {method: {...}}}``; ``quit`` ends it.

Only the standard library is imported at the top: ``numpy`` and the tree's packages are imported
once the tree is on the path.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import traceback

NEEDED = ("_parser", "_defaults", "_model_config", "_spec", "_jax_setup", "_prepare_method")


def _build(label, argv):
    import jax

    import dreamprm_jax
    from benchmarks import _common, step_throughput as st

    missing = [n for n in NEEDED if not hasattr(st, n)]
    if missing:
        raise RuntimeError(f"{st.__file__}: lacks {', '.join(missing)}; the worker needs {', '.join(NEEDED)} "
                           "(step_throughput's layout since the interleaved timing)")
    a = st._defaults(st._parser().parse_args(argv))
    if a.device != "default":
        jax.config.update("jax_platforms", {"gpu": "cuda"}.get(a.device, a.device))
    config = st._model_config(a)
    spec = st._spec(a, config)
    problem = _common.make_problem(config, spec)
    make_params, opt, meta_opt, _, _ = st._jax_setup(a, config)
    inner = jax.device_put(problem["inner_jax"])
    meta = jax.device_put(problem["meta_jax_packed" if a.pack_meta else "meta_jax"])
    records, calls = {}, {}
    for method in a.methods:
        record, call = st._prepare_method(a, config, method, make_params, opt, meta_opt, inner, meta)
        records[method], calls[method] = record, call
        print(f"  [{label}] built {method} (compile {record['compile_s']:.1f}s)",
              file=sys.stderr, flush=True)
    programs = _program_hashes(st, a, config, make_params, opt, meta_opt, inner, meta)
    dev = jax.devices()[0]
    ready = {"ready": True, "package": os.path.dirname(os.path.abspath(dreamprm_jax.__file__)),
             "args": {k: v for k, v in vars(a).items() if isinstance(v, (int, float, str, bool, list, type(None)))},
             "device": f"{dev.platform}:{getattr(dev, 'device_kind', dev)}",
             "records": {m: {"trace_s": r.get("trace_s"), "compile_s": r.get("compile_s"),
                             "program_sha256": programs.get(m)} for m, r in records.items()}}
    return ready, records, calls


def _program_hashes(st, a, config, make_params, opt, meta_opt, inner, meta) -> dict:
    """``{method: sha256 of the step's lowered StableHLO text}`` (no debug locations, so two trees
    that build the same program give the same hash), traced again on an abstract state; ``{}``
    where the tree lacks a piece this needs (``_make_step``, ``train.step.jit_bilevel_step``)."""
    import jax

    try:
        from dreamprm_jax.train import step as step_lib

        state = jax.eval_shape(lambda: step_lib.init_state(make_params(), a.num_domains, opt, meta_opt))
        out = {}
        for method in a.methods:
            step = step_lib.jit_bilevel_step(st._make_step(a, config, method, opt, meta_opt))
            out[method] = hashlib.sha256(step.lower(state, inner, meta).as_text().encode()).hexdigest()
        return out
    except (AttributeError, ImportError, TypeError) as e:
        print(f"  programs not compared: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return {}


def main(label: str, argv: list[str]) -> int:
    reply = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # everything else the tree prints (Python or XLA) goes to stderr
    sys.stdout = sys.stderr

    def send(obj):
        reply.write(json.dumps(obj) + "\n")
        reply.flush()

    try:
        ready, records, calls = _build(label, argv)
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which names the tree
        send({"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]})
        return 1
    send(ready)
    for line in sys.stdin:
        cmd, _, arg = line.strip().partition(" ")
        if cmd == "call":
            try:
                t0 = time.perf_counter()
                calls[arg]()
                send({"s": time.perf_counter() - t0})
            except Exception as e:  # noqa: BLE001 - e.g. out of memory; the parent stops with it
                send({"error": f"iteration of {arg}: {type(e).__name__}: {e}"})
        elif cmd == "report":
            send({"first_metrics": {m: {k: v for k, v in r["first_metrics"].items() if isinstance(v, (int, float))}
                                    for m, r in records.items()}})
        elif cmd == "quit":
            break
        else:
            send({"error": f"unknown request {line.strip()!r}; expected call METHOD, report or quit"})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
