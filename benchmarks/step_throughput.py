"""Throughput of one DreamPRM bi-level iteration per hypergradient method, JAX beside the PyTorch reference.

    python -m benchmarks.step_throughput                          # demo-size PRM on this CPU, + torch
    python -m benchmarks.step_throughput --methods exact darts --repeats 10
    python -m benchmarks.step_throughput --config qwen2_vl_2b --device gpu --methods exact_lowmem darts
    python -m benchmarks.step_throughput --baseline-rev 4ad48b9^1 --methods exact darts --repeats 10
    python -m benchmarks.step_throughput --methods exact darts --weighting domain instance_table instance_net

What is timed (everything the trainer runs, built from its own pieces):

* JAX, per method: ``train.step.make_bilevel_step`` (``none`` = ``reweighting=False``: the plain
  ``T``-step unroll + the meta loss, no hypergradient) jitted with the state donated, as
  ``train.step.jit_bilevel_step`` does. ``jit(...).lower(...).compile()`` is timed apart
  ("compile"; tracing apart as "trace"); then ``--warmup`` untimed iterations and ``--repeats`` timed ones, each
  ``block_until_ready``; the state is threaded from call to call as in training.
  Batches are on the device before timing (the trainer prefetches them too).
* Per weighting (``--weighting``, the trainer's upper-level variable): every method runs once per
  weighting, the run named ``METHOD/WEIGHTING`` (``METHOD`` alone for ``domain``). The instance
  table holds ``--num-records`` weights (replicated, gathered per row by random ``record_ids``
  in ``[0, N)`` added to the inner batches); the Instance Net computes its feature (each row's
  loss at the starting parameters) inside the step. Each such run's time is also given over its
  method's domain-weighted run.
* JAX inner step alone: one ``bilevel.inner_step`` (PRM forward + backward + AdamW), jitted.
* PyTorch (``benchmarks.reference_torch``): DreamPRM's iteration with Betty's DARTS on the same
  initial weights and batches, per ``--torch-threads`` value; its inner step alone too.

Timing order (``--interleave``, the default for the demo config): every run (JAX methods, the
JAX inner step, each torch thread count and its inner step) is built first, then timed
round-robin, one call of each per round with the order rotated every round
(``_common.time_interleaved``). On a shared machine the load changes over seconds (this
2-core CPU: +-25 % between minutes); timed one after another, a change lands on one run only
and moves the ratios between runs by as much. Interleaved, every run sees the same load, and the
ratios are medians of the per-round ratios. ``--no-interleave`` (the default for the 2B config,
whose states do not fit on a device together) times each run alone and frees it before the next.

Reported: median and spread ((max - min) / median) of the repeats, bi-level iterations/s,
inner-step samples/s and tokens/s (real, unpadded tokens), the training samples/s and tokens/s
the bi-level iteration sustains (``T * B`` samples per iteration), ratios (JAX exact vs torch
DARTS, JAX darts vs torch DARTS, JAX exact / JAX darts time), and, on a GPU (or with
``--peak-tflops``), model-FLOPs utilisation.

FLOPs: ``compiled.cost_analysis()['flops']`` (XLA) is recorded as asked, but XLA counts the
body of a ``while`` loop once, and the model scans its layers and the engine its ``T`` steps,
so that number undercounts (by ~``T * layers``). MFU therefore uses ``_common.jaxpr_flops``:
the matmul FLOPs of the whole iteration's jaxpr (the hypergradient's second-order terms
included: they are in the jaxpr), loops multiplied out. ``model_flops`` (the MFU numerator)
is that count traced without remat, and for ``exact_lowmem`` it is ``exact``'s (the same
hypergradient; recomputation is not useful work); ``jaxpr_flops`` is the count of the program
as run (remat recomputation included). Both are in the JSON.

Another revision beside this one (``--baseline-rev REV``, :mod:`benchmarks.baseline_rev`): the
JAX ``--methods`` steps of REV (exported by ``git archive``) and of the working tree, each built by
its own tree's code in its own process, timed round-robin across the two processes in one run;
printed side by side with the ratio new / old (median of per-round ratios) and a
distribution-free confidence interval of it. The other options go to both trees' parsers; the
torch reference and the inner step are not run.

The first (untimed) iteration of JAX ``darts`` and of the torch reference start from the
same state on the same batches: their meta losses and hypergradient norms are printed as a
like-for-like check (``tests/test_reference_torch.py`` checks it with tolerances).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import sys
import time

import numpy as np

from benchmarks import _common
from dreamprm_jax.configs.train_config import WEIGHTINGS
from dreamprm_jax.utils.xla_memory import compiled_memory

METHODS = ("exact", "exact_lowmem", "darts", "none")
H100_BF16_DENSE_TFLOPS = 989.4  # H100 SXM, dense bf16 tensor cores (the usual MFU denominator)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.step_throughput", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", choices=("demo", "qwen2_vl_2b"), default="demo",
                   help="demo: qwen2_vl.demo(hidden_size=--hidden, num_hidden_layers=--layers); qwen2_vl_2b: the "
                        "real 2B shapes with random weights (init on the device)")
    p.add_argument("--device", choices=("cpu", "gpu", "tpu", "default"), default="default",
                   help="JAX platform (default: JAX's choice)")
    p.add_argument("--methods", nargs="+", default=list(METHODS),
                   help=f"subset of {METHODS} (or any hypergradient method); NAME:mixed / NAME:reverse sets the "
                        "second_order option of exact, exact_lowmem and truncated (e.g. exact:mixed), "
                        "NAME:KEY=VALUE any method option (e.g. exact_reversible:in_place=true); options "
                        "are separated by commas")
    p.add_argument("--hidden", type=int, default=64, help="demo: text hidden size")
    p.add_argument("--layers", type=int, default=2, help="demo: decoder layers")
    p.add_argument("--text-layers", type=int, default=None, help="override the config's decoder layers (any config)")
    p.add_argument("--vision-depth", type=int, default=None, help="override the config's vision blocks (any config)")
    p.add_argument("--dtype", default=None, help="compute dtype (default: float32 demo, bfloat16 2B)")
    p.add_argument("--remat", default=None, help="per-block remat policy (default: none demo, full 2B)")
    p.add_argument("--batch", type=int, default=None, help="B training rows per inner step (default 8 demo, 1 2B)")
    p.add_argument("--seq-len", type=int, default=None, help="training bucket L (default 64 demo, 1024 2B)")
    p.add_argument("--image-side", type=int, default=None, help="image side px, one image per row (56 demo, 448 2B)")
    p.add_argument("--unroll", type=int, default=5, help="T inner steps per iteration")
    p.add_argument("--meta-chains", type=int, default=None, help="M meta chains (8 demo, 1 2B)")
    p.add_argument("--meta-steps", type=int, default=None, help="S step prefixes per chain (5 demo, 4 2B)")
    p.add_argument("--num-domains", type=int, default=4)
    p.add_argument("--weighting", nargs="+", choices=WEIGHTINGS, default=["domain"],
                   help="upper-level variables (the trainer's --weighting), one run of every method each; a "
                        "non-domain run is also reported over its method's domain run")
    p.add_argument("--num-records", type=int, default=100_000,
                   help="instance_table: training records N (weights in the table, record_ids drawn in [0, N))")
    p.add_argument("--unroll-inner", action=argparse.BooleanOptionalAction, default=None,
                   help="unroll exact's T-step inner scan into straight-line code instead of the loop (the "
                        "trainer's --unroll-inner-scan, make_bilevel_step(unroll_inner=); the other methods keep "
                        "the loop, their smaller program); default: as the trainer's presets do, the loop for the "
                        "demo (CPU demo, paired A/B: exact 17 %% faster looped, compile about 40 %% shorter), "
                        "unrolled for qwen2_vl_2b (exact's loop stacks per-step residuals: 315 GiB against 211)")
    p.add_argument("--pack-meta", action=argparse.BooleanOptionalAction, default=True,
                   help="JAX scores each meta chain as one packed row (the trainer's default, --pack-meta); "
                        "--no-pack-meta: one row per step prefix, as the PyTorch reference does")
    p.add_argument("--R", type=float, default=0.01, help="DARTS radius (Betty's darts_alpha)")
    p.add_argument("--inner-lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=1, help="untimed iterations (rounds) after compiling")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed iterations per run, median reported (default 15 with --interleave, else 5)")
    p.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=None,
                   help="time all runs round-robin, one iteration of each per round with the order rotated every "
                        "round, so a shared machine's load changes reach every run alike; ratios are then medians "
                        "of per-round ratios. Needs every run's state in memory at once. Default: on for the demo "
                        "config, off for qwen2_vl_2b (runs one after another, each freed before the next)")
    p.add_argument("--no-inner-step", action="store_true", help="skip the standalone inner-step timing")
    p.add_argument("--torch", dest="torch", action="store_true", default=None, help="run the PyTorch reference")
    p.add_argument("--no-torch", dest="torch", action="store_false", help="skip the PyTorch reference")
    p.add_argument("--torch-threads", type=int, nargs="+", default=[1, 2],
                   help="torch.set_num_threads values, one reference run each (ratios use the fastest)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help=f"peak FLOP/s for MFU in TFLOP/s (default on GPU: {H100_BF16_DENSE_TFLOPS}, H100 SXM bf16 dense)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--baseline-rev", default=None, metavar="REV",
                   help="time the --methods steps of git revision REV beside the working tree's, interleaved in "
                        "one run (benchmarks.baseline_rev); REV's own step_throughput must parse the other options")
    p.add_argument("--out", default=None,
                   help="JSON path (default benchmarks/results/step_throughput.json, with --baseline-rev "
                        "step_throughput_baseline.json)")
    return p


def _defaults(a):
    big = a.config == "qwen2_vl_2b"
    fill = dict(dtype="bfloat16" if big else "float32", remat="full" if big else "none", batch=1 if big else 8,
                seq_len=1024 if big else 64, image_side=448 if big else 56, meta_chains=1 if big else 8,
                meta_steps=4 if big else 5)
    for k, v in fill.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if a.torch is None:
        a.torch = not big and a.device in ("cpu", "default")
    if a.interleave is None:
        a.interleave = not big
    if a.unroll_inner is None:
        a.unroll_inner = big
    if a.repeats is None:
        a.repeats = 15 if a.interleave else 5
    if a.out is None:
        name = "step_throughput_baseline.json" if a.baseline_rev else "step_throughput.json"
        a.out = os.path.join("benchmarks", "results", name)
    return a


def _model_config(a):
    from dreamprm_jax.models import qwen2_vl

    if a.config == "qwen2_vl_2b":
        config = qwen2_vl.qwen2_vl_2b(dtype=a.dtype, remat=a.remat)
    else:
        config = qwen2_vl.demo(hidden_size=a.hidden, num_hidden_layers=a.layers, dtype=a.dtype, remat=a.remat)
    if a.text_layers:
        config = config.replace(text=dataclasses.replace(config.text, num_hidden_layers=a.text_layers))
    if a.vision_depth:
        config = config.replace(vision=dataclasses.replace(config.vision, depth=a.vision_depth))
    return config


def _spec(a, config) -> _common.ProblemSpec:
    head = 3 + (a.image_side // 14) ** 2 // 4 if a.image_side else 0
    if a.config == "qwen2_vl_2b":  # meta prefixes up to the same 1024-token bucket
        step_len = max(1, (a.seq_len - head) // (2 * a.meta_steps))
        question = max(1, a.seq_len - head - a.meta_steps * step_len - _common.ProblemSpec.template_len)
        min_fill = 1.0
    else:
        step_len, question, min_fill = 8, 16, 0.6
    return _common.ProblemSpec(batch=a.batch, seq_len=a.seq_len, unroll=a.unroll, meta_chains=a.meta_chains,
                               meta_steps=a.meta_steps, step_len=step_len, question_len=question,
                               image_side=a.image_side, num_domains=a.num_domains, seed=a.seed, min_fill=min_fill)


def _cost_flops(compiled) -> float | None:
    try:
        ca = compiled.cost_analysis()
        if isinstance(ca, (list, tuple)):
            ca = ca[0]
        return float(ca["flops"]) if ca and "flops" in ca else None
    except Exception:  # noqa: BLE001 - not every backend implements it
        return None


def _memory_dict(compiled) -> dict | None:
    mem = compiled_memory(compiled)
    return None if mem is None else mem._asdict()


# ------------------------------------------------------------------------------ JAX


def _jax_setup(a, config):
    """``(make_params, opt, meta_opt, n_params, init_s)``; ``make_params()`` draws the same random PRM
    each call, allocated directly on the device (one jitted init, sized by ``eval_shape``), so every
    method starts from identical weights without a spare copy held in device memory."""
    import jax

    from dreamprm_jax.models import prm
    from dreamprm_jax.train import step as step_lib

    key = jax.random.key(a.seed)
    shapes = jax.eval_shape(lambda k: prm.init(config, k), key)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    init = jax.jit(lambda k: prm.init(config, k))

    def make_params():
        return init(key)

    t0 = time.perf_counter()
    jax.block_until_ready(make_params())
    opt = step_lib.inner_optimizer(a.inner_lr, 5000, 0.5, 0.01)
    meta_opt = step_lib.meta_optimizer(0.01, 1e-3)
    return make_params, opt, meta_opt, n_params, time.perf_counter() - t0


def _fresh_state(make_params, num_domains, opt, meta_opt, weighting="domain", num_records=0):
    import jax

    from dreamprm_jax.train import step as step_lib

    def init(p):
        upper = None if weighting == "domain" else step_lib.init_upper(weighting, num_domains=num_domains,
                                                                        num_records=num_records)
        return step_lib.init_state(p, num_domains, opt, meta_opt, raw_weights=upper)

    return jax.jit(init, donate_argnums=(0,))(make_params())


def run_name(method: str, weighting: str) -> str:
    """A timed run: the method spec, with ``/WEIGHTING`` unless the weighting is ``domain``."""
    return method if weighting == "domain" else f"{method}/{weighting}"


def _with_record_ids(a, inner):
    """``(inner, record_domains)``: ``inner [T, B]`` with random ``record_ids`` in ``[0, N)`` and every
    record's domain ``[N]`` (random, the rows' own domains at their ids), for the instance table."""
    import jax

    rng = np.random.default_rng(a.seed + 2)
    domain_ids = np.asarray(inner.domain_ids)  # [T, B]
    record_ids = rng.integers(0, a.num_records, size=domain_ids.shape).astype(np.int32)  # [T, B]
    record_domains = rng.integers(0, a.num_domains, size=a.num_records).astype(np.int32)  # [N]
    record_domains[record_ids] = domain_ids
    return inner.replace(record_ids=jax.device_put(record_ids)), record_domains


def _option_value(text: str):
    """``true`` / ``false`` / an integer / a float, else the text itself."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _split_method(method: str) -> tuple[str, dict]:
    """A method spec ``NAME[:OPTION[,OPTION...]]`` -> ``(NAME, options)``; an ``OPTION`` is
    ``KEY=VALUE`` or a bare second-order mode: ``"exact:mixed"`` -> ``("exact", {"second_order":
    "mixed"})``, ``"exact_reversible:in_place=true"`` -> ``("exact_reversible", {"in_place": True})``,
    ``"darts"`` -> ``("darts", {})``."""
    name, _, rest = method.partition(":")
    options = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if eq:
            options[key] = _option_value(value)
        else:
            options["second_order"] = item
    return name, options


def _make_step(a, config, method, opt, meta_opt, weighting="domain", record_domains=None):
    from dreamprm_jax.train import step as step_lib

    name, options = _split_method(method)
    if name in ("darts", "sama"):
        options["R"] = a.R
    return step_lib.make_bilevel_step(config, opt, meta_opt, method="exact" if name == "none" else name,
                                      reweighting=name != "none", method_options=options,
                                      unroll_inner=a.unroll_inner, weighting=weighting,
                                      record_domains=record_domains,
                                      num_domains=None if weighting == "domain" else a.num_domains)


def _model_flops(a, config, method, opt, meta_opt, state, inner, meta, weighting="domain",
                 record_domains=None) -> float:
    """Matmul FLOPs of the useful work: the method's jaxpr without remat (``exact_lowmem``,
    ``exact_reversible``: ``exact``'s, the same hypergradient without the recomputation). Traced only,
    never compiled."""
    import jax

    name, options = _split_method(method)
    if name in ("exact_lowmem", "exact_reversible"):
        method = ":".join(["exact", *([options["second_order"]] if "second_order" in options else [])])
    fn = _make_step(a, config.replace(remat="none"), method, opt, meta_opt, weighting, record_domains)
    return _common.jaxpr_flops(jax.make_jaxpr(fn)(state, inner, meta))["flops"]


def _prepare_method(a, config, method, make_params, opt, meta_opt, inner, meta, weighting="domain"):
    """``(record, call)``: the method's step under ``weighting`` traced, counted and compiled (times in
    ``record``), and ``call()``, one iteration on its own threaded state (the first one records the
    metrics, all but the instance weights themselves)."""
    import jax

    from dreamprm_jax.train import step as step_lib

    record_domains = None
    if weighting == "instance_table":
        inner, record_domains = _with_record_ids(a, inner)
    fn = _make_step(a, config, method, opt, meta_opt, weighting, record_domains)
    step = step_lib.jit_bilevel_step(fn)
    state = _fresh_state(make_params, a.num_domains, opt, meta_opt, weighting, a.num_records)
    t0 = time.perf_counter()
    traced = step.trace(state, inner, meta)  # one trace: its jaxpr is counted, then lowered
    trace_s = time.perf_counter() - t0
    hw = _common.jaxpr_flops(traced.jaxpr)
    model_flops = _model_flops(a, config, method, opt, meta_opt, state, inner, meta, weighting, record_domains)
    t0 = time.perf_counter()
    compiled = traced.lower().compile()
    compile_s = time.perf_counter() - t0
    holder = {"state": state}
    first = {}

    def call():
        holder["state"], metrics = compiled(holder["state"], inner, meta)
        jax.block_until_ready(metrics)
        if not first:
            first.update({k: np.asarray(v).tolist() for k, v in metrics.items() if k != "instance_weights"})

    record = {"trace_s": trace_s, "compile_s": compile_s, "xla_cost_analysis_flops": _cost_flops(compiled),
              "jaxpr_flops": hw["flops"], "jaxpr_dynamic_while_loops": hw["dynamic_while_loops"],
              "model_flops": model_flops, "memory": _memory_dict(compiled), "first_metrics": first}
    return record, call


def _prepare_inner_step(a, config, make_params, opt, inner):
    """``(record, call)`` of one jitted inner step (PRM forward + backward + AdamW) on the first batch."""
    import jax
    import jax.numpy as jnp

    from dreamprm_jax import bilevel
    from dreamprm_jax.train import step as step_lib

    inner_loss, _ = step_lib.make_losses(config, "mean")
    batch = jax.tree.map(lambda x: x[0], inner)
    raw = jnp.zeros((a.num_domains,), jnp.float32)
    fn = jax.jit(lambda p, s: bilevel.inner_step(inner_loss, opt, p, s, raw, batch)[:2], donate_argnums=(0, 1))
    p = make_params()
    s = jax.jit(opt.init)(p)
    t0 = time.perf_counter()
    compiled = fn.lower(p, s).compile()
    compile_s = time.perf_counter() - t0
    holder = [p, s]

    def call():
        holder[0], holder[1] = compiled(holder[0], holder[1])
        jax.block_until_ready(holder[0])

    return {"compile_s": compile_s, "xla_cost_analysis_flops": _cost_flops(compiled)}, call


# ------------------------------------------------------------------------------ torch


def _prepare_torch(a, config, params_host, problem, threads):
    """``(record, iteration_call, inner_step_call)`` of one PyTorch reference with ``threads``
    threads (set again before every call, so references with different counts can alternate)."""
    import torch

    from benchmarks.reference_torch import TorchReference

    ref = TorchReference(config, params_host, a.num_domains, inner_lr=a.inner_lr, R=a.R, threads=threads)
    inner = [ref.inputs(b) for b in problem["inner_hf"]]
    meta = ref.inputs(problem["meta_hf"])
    first = {}

    def iteration():
        torch.set_num_threads(threads)
        out = ref.iteration(inner, meta)
        if not first:
            first.update(meta_loss=out["meta_loss"], hypergrad_norm=float(np.linalg.norm(out["hypergradient"])),
                         inner_loss=float(np.mean(out["inner_losses"])), hypergradient=out["hypergradient"].tolist())

    def inner_step():
        torch.set_num_threads(threads)
        ref.inner_step(inner[0])

    return {"threads": threads, "first_metrics": first}, iteration, inner_step


# ------------------------------------------------------------------------------ main


def _with_calls(prepared, name):
    record, call = prepared
    return record, {name: call}


def _torch_calls(a, config, params_host, problem, threads):
    record, iteration, inner_step = _prepare_torch(a, config, params_host, problem, threads)
    calls = {f"torch darts (t={threads})": iteration}
    if not a.no_inner_step:
        calls[f"torch inner step (t={threads})"] = inner_step
    return record, calls


def _error_record(e: Exception) -> dict:
    return {"error": f"{type(e).__name__}: {str(e)[:500]}"}


def _guarded(fn, finish):
    """``fn()``, or on an exception (e.g. out of device memory) ``finish(error record, {})``:
    the failure is recorded and the other runs go on."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001
        finish(_error_record(e), {})
        gc.collect()
        return None, {}


def _finish_inner_step(result, a, tok_per_step, record, timings):
    if "error" in record:
        result["jax"]["inner_step"] = record
        print(f"  jax inner step failed: {record['error'][:200]}", flush=True)
        return
    r = {**record, **timings["jax inner step"]}
    r.update(samples_per_s=a.batch / r["median_s"], tokens_per_s=tok_per_step / r["median_s"])
    result["jax"]["inner_step"] = r
    print(f"  jax inner step: compile {r['compile_s']:.1f}s, {1e3 * r['median_s']:.1f} ms", flush=True)


def _finish_method(result, a, problem, peak, method, record, timings):
    if "error" in record:
        result["jax"][method] = record
        print(f"  jax {method} failed: {record['error'][:200]}", flush=True)
        return
    r = {**record, **timings[f"jax {method}"]}
    r.update(_rates(r["median_s"], a, problem))
    if peak:
        r["achieved_tflops"] = r["model_flops"] / r["median_s"] / 1e12
        r["mfu"] = r["achieved_tflops"] / peak
        if r["xla_cost_analysis_flops"]:
            r["mfu_xla_cost_analysis"] = r["xla_cost_analysis_flops"] / r["median_s"] / 1e12 / peak
    result["jax"][method] = r
    print(f"  jax {method}: compile {r['compile_s']:.1f}s, {1e3 * r['median_s']:.1f} ms/iteration", flush=True)


def _finish_torch(result, a, problem, tok_per_step, record, timings):
    if "error" in record:
        print(f"  torch reference failed: {record['error'][:200]}", flush=True)
        result["torch_error"] = record["error"]
        return
    n = record["threads"]
    it = {**timings[f"torch darts (t={n})"], **_rates(timings[f"torch darts (t={n})"]["median_s"], a, problem)}
    step = timings.get(f"torch inner step (t={n})")
    if step:
        step = {**step, "samples_per_s": a.batch / step["median_s"], "tokens_per_s": tok_per_step / step["median_s"]}
    result["torch"][f"darts_threads{n}"] = {"threads": n, "iteration": it, "inner_step": step,
                                            "first_metrics": record["first_metrics"]}
    print(f"  torch darts ({n} threads): {1e3 * it['median_s']:.1f} ms/iteration", flush=True)


def _rates(t, a, problem):
    B, T = a.batch, a.unroll
    tokens = sum(problem["inner_tokens"])
    return {"iterations_per_s": 1.0 / t, "train_samples_per_s": T * B / t, "train_tokens_per_s": tokens / t}


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    a = _defaults(_parser().parse_args(argv))
    if a.baseline_rev:
        from benchmarks import baseline_rev

        return baseline_rev.main(a, baseline_rev.split_baseline_argv(argv)[1])
    import jax

    if a.device != "default":
        jax.config.update("jax_platforms", {"gpu": "cuda"}.get(a.device, a.device))
    from dreamprm_jax.models import prm  # noqa: F401  (imports after the platform choice)

    config = _model_config(a)
    spec = _spec(a, config)
    problem = _common.make_problem(config, spec)
    make_params, opt, meta_opt, n_params, init_s = _jax_setup(a, config)
    inner = jax.device_put(problem["inner_jax"])
    meta = jax.device_put(problem["meta_jax_packed" if a.pack_meta else "meta_jax"])
    dev = jax.devices()[0]
    peak = a.peak_tflops if a.peak_tflops else (H100_BF16_DENSE_TFLOPS if dev.platform == "gpu" else None)
    tok_per_step = problem["inner_tokens"][0]
    print(f"[step_throughput] {a.config} ({n_params / 1e6:.1f} M params, dtype {a.dtype}, remat {a.remat}) on "
          f"{dev.platform}:{getattr(dev, 'device_kind', dev)}; B={a.batch} L={a.seq_len} T={a.unroll} "
          f"meta {a.meta_chains}x{a.meta_steps} " + (f"packed ({a.meta_chains} rows of {spec.packed_meta_seq_len})" if a.pack_meta
                                                     else f"({a.meta_chains * a.meta_steps} rows of {spec.meta_seq_len})")
          + f" image {a.image_side}px; "
          f"init {init_s:.1f}s", flush=True)

    result = {"benchmark": "step_throughput", "args": vars(a), "spec": dataclasses.asdict(spec),
              "num_params": n_params, "inner_tokens": problem["inner_tokens"], "meta_tokens": problem["meta_tokens"],
              "versions": _common.versions(), "peak_tflops": peak, "jax": {}, "torch": {},
              "flops_note": ("mfu uses model_flops = matmul FLOPs of the iteration's jaxpr with loops multiplied out, "
                             "traced without remat (exact_lowmem: exact's count; recomputation is not useful work); "
                             "jaxpr_flops = the same count on the program as run (remat recomputation included; "
                             "exact_lowmem's dynamic-length recomputation loop counted once); "
                             "xla_cost_analysis_flops = compiled.cost_analysis()['flops'], which counts each while-loop "
                             "body once (layers and T steps are scanned), so it undercounts")}

    jobs = []  # (prepare, finish): prepare() -> (record, {timer name: call}); finish(record, {timer name: timing})
    if not a.no_inner_step:
        jobs.append((lambda: _with_calls(_prepare_inner_step(a, config, make_params, opt, inner), "jax inner step"),
                     lambda rec, t: _finish_inner_step(result, a, tok_per_step, rec, t)))
    for method in a.methods:
        for weighting in a.weighting:
            run = run_name(method, weighting)
            jobs.append((lambda m=method, w=weighting, n=run: _with_calls(
                _prepare_method(a, config, m, make_params, opt, meta_opt, inner, meta, w), f"jax {n}"),
                lambda rec, t, n=run: _finish_method(result, a, problem, peak, n, rec, t)))
    if a.torch:
        params_host = jax.device_get(make_params())
        for threads in a.torch_threads:
            jobs.append((lambda n=threads: _torch_calls(a, config, params_host, problem, n),
                         lambda rec, t: _finish_torch(result, a, problem, tok_per_step, rec, t)))

    if a.interleave:
        prepared, calls = [], {}
        for prepare, finish in jobs:
            rec, job_calls = _guarded(prepare, finish)
            if job_calls:
                prepared.append((finish, rec, list(job_calls)))
                calls.update(job_calls)
                compiled = f" (compile {rec['compile_s']:.1f}s)" if "compile_s" in rec else ""
                print(f"  built {', '.join(job_calls)}{compiled}", flush=True)
        print(f"  timing {len(calls)} runs round-robin: {a.warmup} warm-up + {a.repeats} timed rounds, the order "
              "rotated every round", flush=True)
        timings = _common.time_interleaved(calls, a.warmup, a.repeats)
        for finish, rec, names in prepared:
            finish(rec, {n: timings[n] for n in names})
    else:  # one run at a time, each freed before the next is built (the 2B states do not fit together)
        for prepare, finish in jobs:
            rec, job_calls = _guarded(prepare, finish)
            if job_calls:
                try:
                    timings = {n: _common.time_calls(c, a.warmup, a.repeats) for n, c in job_calls.items()}
                except Exception as e:  # noqa: BLE001 - e.g. out of memory at run time
                    finish(_error_record(e), {})
                else:
                    finish(rec, timings)
            del job_calls
            gc.collect()
    result["interleaved"] = bool(a.interleave)

    result["ratios"] = _ratios(result, a)
    _print_table(result, a)
    load = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    result["versions"]["load_average_1_5_15_end"] = load
    _common.write_json(a.out, result)
    if load:
        print(f"load average at the end (1/5/15 min): {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} on "
              f"{os.cpu_count()} cores (others' work on a shared machine inflates and spreads the times)")
    print(f"wrote {a.out}")
    return result


def _ratios(result, a) -> dict:
    """Speed-ups against the fastest torch run, time ratios between JAX methods (domain-weighted runs)
    and of each other weighting over its method's domain run: with ``--interleave`` the median of the
    per-round ratios (``_common.paired_ratio``), otherwise the ratio of the medians."""
    timed = {k: v for k, v in result["jax"].items() if "median_s" in v}
    jx = {k: v for k, v in timed.items() if "/" not in k}  # domain-weighted runs
    paired = result.get("interleaved", False)

    def ratio(num, den):
        return _common.paired_ratio(num, den) if paired else num["median_s"] / den["median_s"]

    out = {"ratio_statistic": "median of per-round ratios" if paired else "ratio of medians"}
    torch_runs = {k: v["iteration"] for k, v in result["torch"].items()}
    if torch_runs:
        best = min(torch_runs, key=lambda k: torch_runs[k]["median_s"])
        out["torch_reference_run"] = best
        for m in jx:
            if m != "inner_step":
                out[f"speedup_jax_{m}_vs_torch_darts"] = ratio(torch_runs[best], jx[m])
    for base, not_over in (("darts", ("inner_step", "darts", "none")), ("none", ("inner_step", "none"))):
        if base in jx:
            for m in jx:
                if m not in not_over:
                    out[f"time_ratio_jax_{m}_over_jax_{base}"] = ratio(jx[m], jx[base])
    for m in a.methods:
        for w in a.weighting:
            if w != "domain" and m in jx and run_name(m, w) in timed:
                out[f"time_ratio_jax_{run_name(m, w)}_over_jax_{m}"] = ratio(timed[run_name(m, w)], jx[m])
    if "darts" in jx and result["torch"]:
        fj = jx["darts"]["first_metrics"]
        ft = next(iter(result["torch"].values()))["first_metrics"]
        out["first_iteration_check"] = {"meta_loss_jax": fj.get("meta_loss"), "meta_loss_torch": ft.get("meta_loss"),
                                        "hypergrad_norm_jax": fj.get("hypergrad_norm"),
                                        "hypergrad_norm_torch": ft.get("hypergrad_norm")}
    return out


def _print_table(result, a):
    peak = result["peak_tflops"]
    print()
    print(f"{'run':<26} {'compile s':>9} {'median ms':>10} {'spread %':>8} {'it/s':>8} {'samples/s':>10} "
          f"{'tokens/s':>10}" + (f" {'TFLOP/s':>8} {'MFU %':>6}" if peak else ""))

    def row(name, r, compile_s=None, per_step=False):
        if "error" in r:
            print(f"{name:<26} {r['error'][:90]}")
            return
        its = "" if per_step else f"{1.0 / r['median_s']:8.3f}"
        sps = r.get("samples_per_s") if per_step else r.get("train_samples_per_s")
        tps = r.get("tokens_per_s") if per_step else r.get("train_tokens_per_s")
        line = (f"{name:<26} {'' if compile_s is None else f'{compile_s:9.1f}':>9} {1e3 * r['median_s']:10.1f} "
                f"{r['spread_pct']:8.1f} {its:>8} {sps:10.1f} {tps:10.0f}")
        if peak and "mfu" in r:
            line += f" {r['achieved_tflops']:8.2f} {100 * r['mfu']:6.2f}"
        print(line)

    if "inner_step" in result["jax"]:
        r = result["jax"]["inner_step"]
        row("jax inner step", r, r.get("compile_s"), per_step=True)
    for k, r in result["torch"].items():
        if r["inner_step"]:
            row(f"torch inner step (t={r['threads']})", r["inner_step"], per_step=True)
    for m in a.methods:
        for w in a.weighting:
            if run_name(m, w) in result["jax"]:
                r = result["jax"][run_name(m, w)]
                row(f"jax {run_name(m, w)}", r, r.get("compile_s"))
    for k, r in result["torch"].items():
        row(f"torch darts (t={r['threads']})", r["iteration"])
    print("(bi-level rows: samples/s and tokens/s are training rows / real tokens through the T inner steps per "
          "second of whole iterations; 'inner step' rows: one step alone)")
    if peak:
        print(f"MFU: model FLOPs of the whole bi-level iteration counted from its jaxpr (matmuls, second-order terms "
              f"included, loops multiplied out), peak {peak} TFLOP/s; XLA cost_analysis flops (loop bodies counted "
              f"once) in the JSON as xla_cost_analysis_flops / mfu_xla_cost_analysis")
    for k, v in result["ratios"].items():
        if isinstance(v, float):
            print(f"  {k}: {v:.2f}")
        else:
            print(f"  {k}: {v}")


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
