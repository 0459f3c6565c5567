"""Compiled memory of one bi-level iteration of the full Qwen2-VL-2B PRM, no weights allocated.

    python -m benchmarks.memory                                   # the default grid (< 10 min on 2 CPU cores)
    python -m benchmarks.memory --methods exact,exact_lowmem --unroll 1,2,3,4,5,6,7,8 --remat full --devices 1,8
    python -m benchmarks.memory --layers 4                        # fewer decoder / vision layers (see below)
    python -m benchmarks.memory --methods exact,exact_lowmem --second-order reverse,mixed --append
    python -m benchmarks.memory --methods exact_reversible --options '{"in_place": true}' --devices 1 --append
    python -m benchmarks.memory --methods darts --devices 1 --weighting domain,instance_table,instance_net

What is measured: the jitted bi-level iteration of training
(:func:`dreamprm_jax.train.step.make_bilevel_step`: ``T`` inner AdamW steps + hypergradient +
meta AdamW step, state donated) is *lowered and compiled* for abstract shapes
(``jax.eval_shape`` of the state's initialisation: nothing is allocated) and XLA's
``compiled.memory_analysis()`` is printed: argument, output, alias (donated), temporary bytes
per device, and ``peak = argument + output - alias + temp`` (XLA's own upper bound on live
bytes of the program; the buffers of one device under SPMD). Sharding uses exactly the
trainer's rules (:mod:`dreamprm_jax.train.sharding`: FSDP over ``d`` devices, mesh
``data=1,fsdp=d``, the inner optimizer wrapped by ``constrain_optimizer``).

The sample (DreamPRM's, batch 1): one 448x448 image = 32x32 = 1024 patches -> 256 image
tokens, 1024 tokens per sequence; inner batches ``[T, 1, 1024]``; the meta batch is one
chain of 5 step prefixes (5 sequences of 1024 tokens, each with the image: 5120 patches).
``--domains`` (default 15) sets ``K``. ``--weighting`` chooses the upper-level variable as the
trainer's flag does: the ``[K]`` domain weights, a table of ``--num-records`` instance weights
(replicated on every device; the inner batches then carry ``record_ids [T, 1]``), or the
Instance Net (its feature, each row's loss at the starting parameters, computed in the
iteration). Compute dtype ``--dtype`` (default bfloat16; the
parameters and both optimizer states are float32 regardless, see DESIGN.md).

Caveats, said plainly:

* The compile runs on the CPU backend (``--xla_force_host_platform_device_count``; this
  script re-executes itself with that flag when needed). XLA:CPU's buffer assignment and
  scheduling are not XLA:GPU's (no GPU fusion-specific temporaries, a different
  scheduler), so the numbers are an estimate of a GPU's, typically within tens of percent;
  they are exact for what was compiled.
* With batch 1 the batch cannot be split over devices, so FSDP shards only the state
  (parameters, gradients, Adam moments, the unroll's carry); activations are replicated.
* ``--layers N`` replaces the 28 decoder layers and the 32 vision blocks by ``N`` each.
  Layers are stacked and scanned, so state and per-layer saved activations scale linearly
  in the number of layers; the JSON records the override and the table says so.

Writes ``benchmarks/results/memory.json`` (one record per setting, appended as each
compile finishes, so an interrupted run keeps its results) and prints a table marking the
settings whose per-device peak fits 80 GB (``--budget-gb``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time

from dreamprm_jax.configs.train_config import WEIGHTINGS
from dreamprm_jax.utils.xla_memory import compiled_memory

GIB = 1024 ** 3
DEFAULT_METHODS = "exact,exact_lowmem,exact_forward,darts,truncated"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--methods", default=DEFAULT_METHODS, help="comma-separated hypergradient methods")
    p.add_argument("--unroll", default="5", help="comma-separated unroll lengths T (e.g. 1,2,3,4,5,6,7,8)")
    p.add_argument("--remat", default="full", help="comma-separated config.remat policies: none, full, dots_saveable")
    p.add_argument("--devices", default="1,8", help="comma-separated FSDP device counts (1, 2, 4, 8)")
    p.add_argument("--layers", type=int, default=0, help="override decoder layers and vision blocks (0: the real 28/32)")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence")
    p.add_argument("--image-side", type=int, default=448, help="image side in pixels (multiple of 28)")
    p.add_argument("--meta-steps", type=int, default=5, help="step prefixes of the one meta chain")
    p.add_argument("--domains", type=int, default=15, help="number of domains K")
    p.add_argument("--weighting", default="domain",
                   help="comma-separated upper-level variables: domain, instance_table, instance_net")
    p.add_argument("--num-records", type=int, default=100_000, help="instance_table: training records N")
    p.add_argument("--dtype", default="bfloat16", help="compute dtype (parameters stay float32)")
    p.add_argument("--second-order", default="mixed",
                   help="comma-separated: reverse, mixed (how exact / exact_lowmem / truncated differentiate "
                        "through each inner step's gradient; other methods ignore it; mixed is the engine's default)")
    p.add_argument("--inner-scan", default="unrolled",
                   help="comma-separated: unrolled, loop: exact's T-step inner scan as straight-line code, as the "
                        "qwen2_vl_2b preset trains it (--unroll-inner-scan), or as a loop, which stacks per-step "
                        "residuals in [T, ...] buffers; the other methods always loop (train.step.UNROLL_PAYS_METHODS)")
    p.add_argument("--forward-chunk", type=int, default=1, help="exact_forward chunk_size (tangents per pass)")
    p.add_argument("--truncated-k", type=int, default=1, help="truncated: steps kept")
    p.add_argument("--options", default="{}",
                   help="JSON object of further method options for every method of --methods (as the trainer's "
                        "--hypergradient-options), e.g. '{\"in_place\": true}' for exact_reversible; a record's "
                        "method is then named with them, exact_reversible[in_place=true]")
    p.add_argument("--budget-gb", type=float, default=80.0, help="device memory to compare against (GB = 1e9 B)")
    p.add_argument("--time-limit", type=float, default=540.0, help="stop starting new compiles after this many s")
    p.add_argument("--out", default=os.path.join("benchmarks", "results", "memory.json"))
    p.add_argument("--append", action="store_true", help="keep the records already in --out (other settings)")
    return p


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def _strs(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


#: Options that other flags set (--second-order, --forward-chunk, --truncated-k, --inner-scan).
FLAG_OPTIONS = ("second_order", "chunk_size", "k", "scan_unroll")


def parse_options(text: str) -> dict:
    """``--options``: a JSON object whose keys no other flag sets."""
    try:
        options = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"benchmarks.memory: --options must be a JSON object, got {text!r} ({e})") from e
    if not isinstance(options, dict):
        raise ValueError(f"benchmarks.memory: --options must be a JSON object, got {text!r}")
    taken = sorted(set(options) & set(FLAG_OPTIONS))
    if taken:
        raise ValueError(f"benchmarks.memory: --options sets {taken}, which other flags set (--second-order, "
                         "--forward-chunk, --truncated-k, --inner-scan)")
    return options


def method_label(r: dict) -> str:
    """The method of a record with its ``--options`` and, unless ``domain`` (also a record written
    before ``--weighting``), its weighting: ``exact_reversible[in_place=true]/instance_table``."""
    extra = r.get("method_options") or {}
    label = r["method"]
    if extra:
        label += "[" + ",".join(f"{k}={json.dumps(v)}" for k, v in sorted(extra.items())) + "]"
    weighting = r.get("weighting", "domain")
    return label if weighting == "domain" else f"{label}/{weighting}"


def _ensure_devices(n: int) -> None:
    """Re-exec with ``--xla_force_host_platform_device_count`` before jax is imported."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" in flags or os.environ.get("_DREAMPRM_MEMORY_REEXEC"):
        return
    env = dict(os.environ, XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={n}".strip(),
               JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"), _DREAMPRM_MEMORY_REEXEC="1")
    os.execve(sys.executable, [sys.executable, "-m", "benchmarks.memory", *sys.argv[1:]], env)


def model_config(args, remat: str):
    from dreamprm_jax.models import qwen2_vl

    config = qwen2_vl.qwen2_vl_2b(dtype=args.dtype, remat=remat)
    if args.layers:
        config = dataclasses.replace(
            config, text=dataclasses.replace(config.text, num_hidden_layers=args.layers),
            vision=dataclasses.replace(config.vision, depth=args.layers))
    return config


def abstract_batches(config, args, T: int, weighting: str = "domain"):
    """``jax.ShapeDtypeStruct`` inner batches ``[T, 1, L]`` (with ``record_ids`` for ``instance_table``)
    and the meta batch (1 chain x S)."""
    import jax
    import numpy as np

    from dreamprm_jax.data.types import MetaBatch, ModelInputs, TrainBatch

    v = config.vision
    grid = args.image_side // v.patch_size
    patches = grid * grid  # 1024 for 448 px
    L = args.seq_len
    S = args.meta_steps

    def sd(shape, dtype):
        return jax.ShapeDtypeStruct(tuple(shape), np.dtype(dtype))

    def model(rows, n_images, lead=()):
        return ModelInputs(
            input_ids=sd(lead + (rows, L), np.int32), attention_mask=sd(lead + (rows, L), np.int32),
            position_ids=sd(lead + (3, rows, L), np.int32),
            pixel_values=sd(lead + (n_images * patches, v.patch_dim), np.float32),
            vision_position_ids=sd(lead + (n_images * patches, 2), np.int32),
            vision_segment_ids=sd(lead + (n_images * patches,), np.int32))

    inner = TrainBatch(model(1, 1, (T,)), labels=sd((T, 1), np.float32), domain_ids=sd((T, 1), np.int32),
                       sample_mask=sd((T, 1), np.float32),
                       record_ids=sd((T, 1), np.int32) if weighting == "instance_table" else None)
    meta = MetaBatch(model(S, S), step_mask=sd((1, S), np.float32), labels=sd((1,), np.float32),
                     chain_mask=sd((1,), np.float32))
    return inner, meta, patches


SECOND_ORDER_METHODS = ("exact", "exact_lowmem", "exact_reversible", "truncated")
INNER_SCANS = ("unrolled", "loop")


def measure(args, method: str, T: int, remat: str, devices: int, second_order: str = "mixed",
            inner_scan: str = "unrolled", extra_options: dict | None = None, weighting: str = "domain") -> dict:
    import jax
    import numpy as np

    from dreamprm_jax.models import prm, qwen2_vl
    from dreamprm_jax.train import sharding
    from dreamprm_jax.train import step as step_lib

    config = model_config(args, remat)
    mesh = sharding.make_mesh(f"data=1,fsdp={devices}")
    optimizer = sharding.constrain_optimizer(step_lib.inner_optimizer(5e-7, 5000, 0.5, 0.01), mesh)
    meta_opt = step_lib.meta_optimizer(0.01, 1e-3)

    def init():
        key = jax.random.key(0)
        params = prm.init(config, key, qwen2_vl.init_params(config, key))
        upper = None if weighting == "domain" else step_lib.init_upper(weighting, num_domains=args.domains,
                                                                        num_records=args.num_records)
        return step_lib.init_state(params, args.domains, optimizer, meta_opt, raw_weights=upper)

    state = jax.eval_shape(init)
    inner, meta, patches = abstract_batches(config, args, T, weighting)
    options = dict(extra_options or {})
    if method == "exact_forward":
        options["chunk_size"] = args.forward_chunk
    if method == "truncated":
        options["k"] = args.truncated_k
    if method in SECOND_ORDER_METHODS:
        options["second_order"] = second_order
    if inner_scan not in INNER_SCANS:
        raise ValueError(f"benchmarks.memory: --inner-scan {inner_scan!r}; expected one of {INNER_SCANS}")
    if inner_scan == "unrolled" and not step_lib.inner_scan_unrolled(method, True):
        raise ValueError(f"benchmarks.memory: {method} keeps the inner scan a loop (make_bilevel_step)")
    record_domains = np.arange(args.num_records, dtype=np.int32) % args.domains  # [N]
    step_fn = step_lib.make_bilevel_step(config, optimizer, meta_opt, method=method, method_options=options,
                                         unroll_inner=inner_scan == "unrolled", weighting=weighting,
                                         record_domains=record_domains if weighting == "instance_table" else None,
                                         num_domains=None if weighting == "domain" else args.domains)
    jitted = sharding.shard_bilevel_step(step_fn, state, inner, meta, mesh)
    t0 = time.perf_counter()
    lowered = jitted.lower(state, inner, meta)
    compiled = lowered.compile()
    seconds = time.perf_counter() - t0
    mem = compiled_memory(compiled)
    if mem is None:
        raise RuntimeError("this backend has no compiled.memory_analysis()")
    n_params = sum(int(x.size) for x in jax.tree.leaves(state["params"]))
    rec = {"method": method, "T": T, "remat": remat, "devices": devices, "options": options,
           "method_options": dict(extra_options or {}), "weighting": weighting,
           "num_records": args.num_records if weighting == "instance_table" else None,
           "second_order": options.get("second_order", "-"), "inner_scan": inner_scan,
           "layers": config.text.num_hidden_layers, "vision_depth": config.vision.depth,
           "layers_overridden": bool(args.layers), "params": n_params, "patches_per_image": patches,
           "seq_len": args.seq_len, "meta_steps": args.meta_steps, "domains": args.domains, "dtype": args.dtype,
           "compile_s": round(seconds, 1)}
    rec.update(mem._asdict())
    rec["fits"] = rec["peak_bytes"] <= args.budget_gb * 1e9
    return rec


def _key(r: dict) -> tuple:
    """A setting's identity (records written before --second-order existed were all "reverse";
    before --inner-scan, the scan's form was not recorded: "?")."""
    so = r.get("second_order", "reverse") if r["method"] in SECOND_ORDER_METHODS else "-"
    return method_label(r), r["T"], r["remat"], r["devices"], so, r.get("inner_scan", "?")


def format_table(records: list[dict], budget_gb: float) -> str:
    width = max([14] + [len(method_label(r)) for r in records])  # labels such as exact_reversible[in_place=true]
    head = (f"{'method':<{width}} {'2nd':<7} {'scan':<8} {'T':>2} {'remat':<14} {'dev':>3} {'args GiB':>9} "
            f"{'out GiB':>8} "
            f"{'alias GiB':>9} "
            f"{'temp GiB':>9} {'peak GiB':>9} {f'fits {budget_gb:g}GB':>10} {'compile s':>9}")
    lines = [head, "-" * len(head)]
    for r in records:
        if "error" in r:
            lines.append(f"{method_label(r):<{width}} {_key(r)[4]:<7} {_key(r)[5]:<8} {r['T']:>2} {r['remat']:<14} "
                         f"{r['devices']:>3}  error: {r['error'][:80]}")
            continue
        lines.append(
            f"{method_label(r):<{width}} {_key(r)[4]:<7} {_key(r)[5]:<8} {r['T']:>2} {r['remat']:<14} "
            f"{r['devices']:>3} "
            f"{r['argument_bytes'] / GIB:>9.2f} "
            f"{r['output_bytes'] / GIB:>8.2f} {r['alias_bytes'] / GIB:>9.2f} {r['temp_bytes'] / GIB:>9.2f} "
            f"{r['peak_bytes'] / GIB:>9.2f} {'yes' if r['fits'] else 'no':>10} {r['compile_s']:>9.1f}")
    if records and records[0].get("layers_overridden"):
        lines.append(f"NOTE: --layers override ({records[0]['layers']} decoder layers / {records[0]['vision_depth']} "
                     "vision blocks instead of 28 / 32): state and per-layer activations scale linearly in depth.")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    devices = _ints(args.devices)
    _ensure_devices(max(devices + [8]))
    import jax

    from benchmarks import _common
    from dreamprm_jax.train import step as step_lib

    if jax.device_count() < max(devices):
        raise SystemExit(f"benchmarks.memory: {jax.device_count()} devices visible, --devices asks for {max(devices)}")
    methods, unrolls, remats = _strs(args.methods), _ints(args.unroll), _strs(args.remat)
    second_orders, scans = _strs(args.second_order), _strs(args.inner_scan)
    extra = parse_options(args.options)
    weightings = _strs(args.weighting)
    unknown = sorted(set(weightings) - set(WEIGHTINGS))
    if unknown:
        raise SystemExit(f"benchmarks.memory: --weighting {unknown}; expected some of {WEIGHTINGS}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    meta = {"command": "python -m benchmarks.memory " + " ".join(sys.argv[1:] if argv is None else argv),
            "machine": platform.platform(), "processor": platform.processor(), "jax": jax.__version__,
            "backend": jax.default_backend(), "budget_gb": args.budget_gb}
    records: list[dict] = []
    grid = [(m, T, r, d, so, sc, w) for r in remats for m in methods for so in
            (second_orders if m in SECOND_ORDER_METHODS else ["-"])
            for sc in (scans if m in step_lib.UNROLL_PAYS_METHODS else ["loop"]) for T in unrolls for d in devices
            for w in weightings]
    if args.append and os.path.isfile(args.out):
        with open(args.out) as f:
            replaced = {(method_label({"method": m, "method_options": extra, "weighting": w}), *rest)
                        for m, *rest, w in grid}
            records = [r for r in json.load(f).get("records", []) if _key(r) not in replaced]
    t_start = time.perf_counter()
    for i, (method, T, remat, d, so, sc, w) in enumerate(grid):
        if time.perf_counter() - t_start > args.time_limit:
            print(f"[memory] time limit {args.time_limit:g} s reached; {len(grid) - i} settings skipped", flush=True)
            meta["skipped"] = [dict(method=m, T=t, remat=r, devices=dd, second_order=o, inner_scan=c, weighting=ww)
                               for m, t, r, dd, o, c, ww in grid[i:]]
            break
        try:
            rec = measure(args, method, T, remat, d, so if so != "-" else "mixed", sc, extra, w)
        except Exception as e:  # noqa: BLE001 - record and go on (one bad setting must not end the sweep)
            rec = {"method": method, "T": T, "remat": remat, "devices": d, "second_order": so, "inner_scan": sc,
                   "method_options": extra, "weighting": w, "error": f"{type(e).__name__}: {e}"}
        records.append(rec)
        if "error" in rec:
            print(f"[memory] {method_label(rec)} ({so}, {sc}) T={T} remat={remat} devices={d}: {rec['error'][:200]}",
                  flush=True)
        else:
            print(f"[memory] {method_label(rec):<14} {so:<7} {sc:<8} T={T} remat={remat:<14} devices={d}: "
                  f"peak {rec['peak_bytes'] / GIB:.2f} GiB "
                  f"per device (compile {rec['compile_s']} s)", flush=True)
        _common.write_json(args.out, {"meta": meta, "records": records})  # after every record: a crash keeps them
    print()
    print(format_table(records, args.budget_gb))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
