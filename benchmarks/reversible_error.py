"""How far ``exact_reversible`` is from ``exact``, by unroll length T, Adam's b1 and the inner rate.

    python -m benchmarks.reversible_error                       # T = 5,20,50,100; b1 = 0.9,0.5; lr = 1e-3,1e-2
    python -m benchmarks.reversible_error --unroll 5,10 --b1 0.9 --lr 5e-7
    python -m benchmarks.reversible_error --warm-steps 5             # from a warm optimizer state

The problem is the MLP regression of the engine's tests (``tests/problems.py``: 3 noisy domains,
AdamW with weight decay 1e-2, batch 8), built in float64 and, for the float32 rows, cast (the same
data). ``--warm-steps N`` first runs N AdamW steps on other batches (a warm optimizer state, as
in training after the first iteration; 0: the fresh state m = v = 0). The reference is ``exact``
in float64. Printed per setting: the relative error
``|g - g_ref| / |g_ref|`` of ``exact`` and ``exact_reversible`` in float64 and float32. Runs on
the CPU in a few minutes; writes nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x.strip()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.reversible_error", description=__doc__.split("\n\n")[0])
    p.add_argument("--unroll", default="5,20,50,100", help="comma-separated T")
    p.add_argument("--b1", default="0.9,0.5", help="comma-separated Adam b1")
    p.add_argument("--lr", default="1e-3,1e-2", help="comma-separated inner learning rates")
    p.add_argument("--warm-steps", type=int, default=0, help="AdamW steps on other batches before the unroll")
    args = p.parse_args(argv)

    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import numpy as np

    from dreamprm_jax import bilevel
    from tests import problems

    def rel_err(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))

    def cast32(tree):
        return jax.tree.map(lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)

    def hypergradient(method, prob, batches):
        fn = jax.jit(functools.partial(bilevel.hypergradient, method, prob.inner_loss, prob.outer_loss, prob.optimizer))
        return fn(prob.params, prob.opt_state, prob.alpha, *batches)[0]

    print(f"{'lr':>8} {'b1':>5} {'T':>4} {'exact f64':>10} {'rev f64':>10} {'exact f32':>10} {'rev f32':>10}")
    for lr in _floats(args.lr):
        for b1 in _floats(args.b1):
            for T in [int(t) for t in _floats(args.unroll)]:
                opt = bilevel.inner_adamw(lr, b1=b1, weight_decay=1e-2)
                prob = problems.mlp_regression(seed=0, dtype=jnp.float64, num_domains=3, inner_steps=T, batch_size=8,
                                               outer_batch_size=16, in_dim=4, hidden=16, optimizer=opt)
                prob = dataclasses.replace(prob, alpha=jnp.array([0.3, -0.2, 0.1], jnp.float64))
                if args.warm_steps:
                    warm = problems.mlp_regression(seed=0, dtype=jnp.float64, num_domains=3,
                                                   inner_steps=args.warm_steps, batch_size=8, outer_batch_size=16,
                                                   in_dim=4, hidden=16, optimizer=opt)
                    params, opt_state, _ = bilevel.unroll(prob.inner_loss, opt, prob.params, prob.opt_state,
                                                          prob.alpha, warm.sample_batches(jax.random.PRNGKey(9))[0])
                    prob = dataclasses.replace(prob, params=params, opt_state=opt_state)
                batches = prob.sample_batches(jax.random.PRNGKey(1))
                ref = hypergradient("exact", prob, batches)
                prob32 = dataclasses.replace(prob, params=cast32(prob.params), opt_state=cast32(prob.opt_state),
                                             alpha=cast32(prob.alpha))
                errs = [rel_err(hypergradient(m, pr, b), ref) for pr, b in ((prob, batches), (prob32, cast32(batches)))
                        for m in ("exact", "exact_reversible")]
                print(f"{lr:>8.0e} {b1:>5} {T:>4} " + " ".join(f"{e:>10.1e}" for e in errs), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
