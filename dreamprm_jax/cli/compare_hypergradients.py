"""Compare hypergradient methods against the exact one on a registered toy problem.

    python -m experiments.compare_hypergradients                 # tiny Qwen2-VL PRM on generated data, all methods
    python -m experiments.compare_hypergradients --model mlp     # the pure-engine case
    python -m experiments.compare_hypergradients --model tiny_transformer --methods exact,darts,sama
    python -m experiments.compare_hypergradients --model my_pkg.my_module:factory

For every random state (params re-initialised by the problem factory with another seed,
raw domain weights ``alpha ~ N(0, alpha_scale^2)``) and every batch draw, each method's
hypergradient is compared with ``exact``: cosine similarity, relative error
``||g - g_exact|| / ||g_exact||``, scale-free relative error ``min_c ||c g - g_exact|| /
||g_exact||`` (DARTS in Betty's convention has no learning-rate factor) and per-domain sign
agreement. Each method is jitted once per problem (``jit(...).lower(...).compile()``): compile
time, XLA memory analysis (argument / temp / output bytes) and the median wall time per
call after compilation are reported, plus the exact/darts time ratio. Writes
``<out>/compare_<model>.json`` and ``.png``.

A problem comes from :mod:`dreamprm_jax.bilevel.problems` (``register_problem``); a new
one (e.g. ``--model prm``) only needs registering, or ``module:factory`` on the command line.

Installed, ``dreamprm-compare-hypergradients`` is the same command.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from dreamprm_jax import bilevel
from dreamprm_jax.bilevel import problems


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="prm",
                   help=f"problem name ({', '.join(sorted({'prm', *problems.available_problems()}))}) or 'module:factory'")
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                   help="import MODULE first (repeatable), e.g. one that calls problems.register_problem('prm')")
    p.add_argument("--methods", default=",".join(bilevel.METHODS),
                   help="comma-separated hypergradient methods; 'exact' is always added as the reference")
    p.add_argument("--states", type=int, default=3, help="random states (param init seed + random alpha)")
    p.add_argument("--draws", type=int, default=2, help="batch draws per random state")
    p.add_argument("--seed", type=int, default=0, help="base seed for states and draws")
    p.add_argument("--inner-steps", type=int, default=5, help="T, unrolled inner steps per hypergradient")
    p.add_argument("--num-domains", type=int, default=4, help="K, number of domains (size of alpha)")
    p.add_argument("--inner-lr", type=float, default=1e-3, help="inner AdamW learning rate (StepLR 5000 / 0.5)")
    p.add_argument("--alpha-scale", type=float, default=0.5, help="std of the random raw domain weights")
    p.add_argument("--darts-r", type=float, default=0.01, help="DARTS / SAMA radius R (eps = R / ||v||), Betty's darts_alpha")
    p.add_argument("--darts-lr-eff", type=float, default=1.0, help="DARTS scale lr_eff (1 = Betty's convention)")
    p.add_argument("--neumann-k", type=int, default=3, help="Neumann series terms")
    p.add_argument("--neumann-step", type=float, default=1.0, help="Neumann step size (Betty's neumann_alpha)")
    p.add_argument("--cg-k", type=int, default=3, help="conjugate-gradient iterations")
    p.add_argument("--damping", type=float, default=0.0, help="Hessian damping for neumann / cg")
    p.add_argument("--truncate-k", type=int, default=1, help="steps kept by 'truncated'")
    p.add_argument("--chunk-size", type=int, default=None, help="tangent chunk of exact_forward (default: all)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per hypergradient (median reported)")
    p.add_argument("--x64", action="store_true", help="run in float64")
    p.add_argument("--out", default="runs/compare_hypergradients", help="output directory for JSON and PNG")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    return p.parse_args(argv)


def method_options(args) -> dict:
    return {
        "exact": {}, "exact_forward": {"chunk_size": args.chunk_size}, "exact_lowmem": {},
        "truncated": {"k": args.truncate_k},
        "darts": {"R": args.darts_r, "lr_eff": args.darts_lr_eff},
        "darts_exact": {"lr_eff": args.darts_lr_eff}, "sama": {"R": args.darts_r},
        "neumann": {"k": args.neumann_k, "step_size": args.neumann_step, "damping": args.damping},
        "cg": {"k": args.cg_k, "damping": args.damping},
    }


def _flat(g):
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(g)])


def compare(g, ref) -> dict:
    g, ref = _flat(g), _flat(ref)
    nr, ng = np.linalg.norm(ref), np.linalg.norm(g)
    if not np.all(np.isfinite(g)):
        return {"finite": False, "cosine": float("nan"), "rel_err": float("nan"), "scaled_rel_err": float("nan"),
                "sign_agree": [float("nan")] * g.size}
    c = float(g @ ref / (ng * ng)) if ng > 0 else 0.0
    return {"finite": True, "cosine": float(g @ ref / max(ng * nr, 1e-300)),
            "rel_err": float(np.linalg.norm(g - ref) / max(nr, 1e-300)),
            "scaled_rel_err": float(np.linalg.norm(c * g - ref) / max(nr, 1e-300)),
            "sign_agree": (np.sign(g) == np.sign(ref)).astype(float).tolist()}


def memory(compiled) -> dict:
    try:
        m = compiled.memory_analysis()
    except Exception as e:  # some backends have none
        return {"error": repr(e)}
    if m is None:
        return {}
    keys = ("argument_size_in_bytes", "temp_size_in_bytes", "output_size_in_bytes", "generated_code_size_in_bytes")
    return {k: int(getattr(m, k)) for k in keys if hasattr(m, k)}


def main(argv=None):
    args = parse_args(argv)
    for module in args.imports:
        importlib.import_module(module)
    if args.model == "prm" and "prm" not in problems.PROBLEMS:
        importlib.import_module("dreamprm_jax.train.prm_problem")  # registers "prm" (lazy: model + data imports)
    if args.x64:
        jax.config.update("jax_enable_x64", True)
    dtype = jnp.float64 if args.x64 else jnp.float32
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in bilevel.METHODS:
            raise SystemExit(f"--methods: unknown method {m!r}; expected some of {sorted(bilevel.METHODS)}")
    if "exact" not in methods:
        methods = ["exact"] + methods
    opts = method_options(args)
    kw = dict(dtype=dtype, num_domains=args.num_domains, inner_steps=args.inner_steps, inner_lr=args.inner_lr)
    base = problems.get_problem(args.model, seed=args.seed, **kw)

    # -------------------------------------------------------------- compile every method once
    fns = {m: jax.jit(functools.partial(bilevel.hypergradient, m, base.inner_loss, base.outer_loss,
                                        base.optimizer, **opts.get(m, {}))) for m in methods}
    ex_inner, ex_outer = base.sample_batches(jax.random.PRNGKey(args.seed))
    ex_args = (base.params, base.opt_state, base.alpha, ex_inner, ex_outer)
    compiled, report = {}, {m: {"options": opts.get(m, {}), "runs": []} for m in methods}
    for m in tqdm(methods, desc="compile"):
        t0 = time.perf_counter()
        compiled[m] = fns[m].lower(*ex_args).compile()
        report[m]["compile_s"] = time.perf_counter() - t0
        report[m]["memory"] = memory(compiled[m])

    # -------------------------------------------------------------- states x draws x methods
    bar = tqdm(total=args.states * args.draws * len(methods), desc="hypergradients")
    for s in range(args.states):
        st = problems.get_problem(args.model, seed=args.seed + 1000 * (s + 1), **kw)
        alpha = args.alpha_scale * jax.random.normal(jax.random.PRNGKey(args.seed + 7 * s), jnp.shape(base.alpha), dtype)
        for d in range(args.draws):
            inner, outer = base.sample_batches(jax.random.PRNGKey(args.seed + 100 * s + d + 1))
            call_args = (st.params, st.opt_state, alpha, inner, outer)
            results = {}
            for m in methods:
                times = []
                for _ in range(max(1, args.repeats)):
                    t0 = time.perf_counter()
                    g, aux = jax.block_until_ready(compiled[m](*call_args))
                    times.append(time.perf_counter() - t0)
                results[m] = (g, aux, float(np.median(times)))
                bar.update(1)
            ref = results["exact"][0]
            for m, (g, aux, t) in results.items():
                run = {"state": s, "draw": d, "time_s": t, "g": _flat(g).tolist(), **compare(g, ref)}
                for key in ("residual", "solver_ok", "epsilon", "v_norm"):
                    if key in aux:
                        run[key] = np.asarray(aux[key]).item()
                report[m]["runs"].append(run)
    bar.close()

    # -------------------------------------------------------------- summary table
    for m in methods:
        runs = report[m]["runs"]
        fin = [r for r in runs if r["finite"]]
        report[m]["summary"] = {
            "finite_fraction": len(fin) / max(1, len(runs)),
            "cosine_mean": float(np.mean([r["cosine"] for r in fin])) if fin else float("nan"),
            "cosine_std": float(np.std([r["cosine"] for r in fin])) if fin else float("nan"),
            "rel_err_median": float(np.median([r["rel_err"] for r in fin])) if fin else float("nan"),
            "scaled_rel_err_median": float(np.median([r["scaled_rel_err"] for r in fin])) if fin else float("nan"),
            "sign_agree_per_domain": np.mean([r["sign_agree"] for r in fin], axis=0).tolist() if fin else [],
            "time_s_median": float(np.median([r["time_s"] for r in runs])),
        }
    t_exact = report["exact"]["summary"]["time_s_median"]
    ratio = t_exact / report["darts"]["summary"]["time_s_median"] if "darts" in report else None
    header = f"{'method':14s} {'cos':>7s} {'relerr':>9s} {'scaled':>9s} {'sign':>5s} {'ok':>4s} " \
             f"{'ms/call':>9s} {'compile_s':>9s} {'temp_MB':>8s}"
    print(f"\nproblem {args.model}: T={args.inner_steps}, K={args.num_domains}, {args.states} states x {args.draws} draws, "
          f"device {jax.devices()[0].device_kind}")
    print(header)
    print("-" * len(header))
    for m in methods:
        sm, mem = report[m]["summary"], report[m]["memory"]
        sign = np.mean(sm["sign_agree_per_domain"]) if sm["sign_agree_per_domain"] else float("nan")
        print(f"{m:14s} {sm['cosine_mean']:7.4f} {sm['rel_err_median']:9.2e} {sm['scaled_rel_err_median']:9.2e} "
              f"{sign:5.2f} {sm['finite_fraction']:4.2f} {1e3 * sm['time_s_median']:9.2f} "
              f"{report[m]['compile_s']:9.2f} {mem.get('temp_size_in_bytes', 0) / 2**20:8.2f}")
    if ratio is not None:
        print(f"exact / darts time ratio: {ratio:.2f}")

    os.makedirs(args.out, exist_ok=True)
    name = args.model.replace(":", "_").replace(".", "_")
    out = {"args": vars(args), "device": jax.devices()[0].device_kind, "exact_over_darts_time": ratio,
           "methods": report}
    path = os.path.join(args.out, f"compare_{name}.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {path}")
    if not args.no_plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        x = np.arange(len(methods))
        axes[0].bar(x, [report[m]["summary"]["cosine_mean"] for m in methods],
                    yerr=[report[m]["summary"]["cosine_std"] for m in methods])
        axes[0].set_title("cosine similarity to exact")
        axes[0].set_ylim(-1.05, 1.05)
        axes[1].bar(x, [1e3 * report[m]["summary"]["time_s_median"] for m in methods])
        axes[1].set_title("ms per hypergradient (after compile)")
        axes[2].bar(x, [report[m]["memory"].get("temp_size_in_bytes", 0) / 2**20 for m in methods])
        axes[2].set_title("XLA temp memory (MiB)")
        for ax in axes:
            ax.set_xticks(x, methods, rotation=45, ha="right")
        fig.suptitle(f"{args.model}: T={args.inner_steps}, K={args.num_domains}")
        fig.tight_layout()
        png = os.path.join(args.out, f"compare_{name}.png")
        fig.savefig(png, dpi=100)
        print(f"wrote {png}")
    return out


def console_main() -> int:
    """The ``dreamprm-compare-hypergradients`` command: :func:`main`, exit status 0."""
    main()
    return 0


if __name__ == "__main__":
    main()
