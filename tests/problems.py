"""Toy bilevel problems for the engine's tests.

A *problem* bundles what :func:`dreamprm_jax.bilevel.hypergradient` needs::

    Problem(inner_loss, outer_loss, params, optimizer, opt_state, alpha, sample_batches)

with ``sample_batches(rng) -> (inner_batches [T, ...], outer_batch)``: an MLP regression
over noisy domains, a one-block transformer scoring its last token (a PRM in miniature)
and a strongly convex quadratic with a closed-form implicit hypergradient.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from dreamprm_jax.bilevel.domain_weights import init_raw_weights
from dreamprm_jax.bilevel.inner import inner_adamw, step_lr, unroll
from dreamprm_jax.bilevel.losses import aggregation_loss, weighted_mse


@dataclasses.dataclass(frozen=True)
class Problem:
    """Everything one bilevel iteration needs; see the module docstring."""

    name: str
    inner_loss: Callable
    outer_loss: Callable
    params: Any
    optimizer: optax.GradientTransformation
    opt_state: Any
    alpha: Any
    sample_batches: Callable[[jax.Array], tuple[Any, Any]]
    num_domains: int
    inner_steps: int
    description: str = ""


def _optimizer(inner_lr, optimizer):
    if optimizer is not None:
        return optimizer
    return inner_adamw(step_lr(inner_lr, 5000, 0.5), weight_decay=1e-2)


def _dense_init(key, fan_in, fan_out, dtype):
    return {"kernel": jax.random.normal(key, (fan_in, fan_out), dtype) / math.sqrt(fan_in),
            "bias": jnp.zeros((fan_out,), dtype)}


# ----------------------------------------------------------------------------- MLP regression

def mlp_logits(params, x):
    """Two-layer tanh MLP, ``x [B, D] -> logits [B]``."""
    h = jnp.tanh(x @ params["fc1"]["kernel"] + params["fc1"]["bias"])  # [B, H]
    return (h @ params["fc2"]["kernel"] + params["fc2"]["bias"])[..., 0]  # [B]


def mlp_regression(*, seed: int = 0, dtype=jnp.float32, num_domains: int = 4, inner_steps: int = 5,
                   inner_lr: float = 1e-3, batch_size: int = 32, outer_batch_size: int = 64, in_dim: int = 8,
                   hidden: int = 32, optimizer: optax.GradientTransformation | None = None) -> Problem:
    """MLP regression with domains of growing label noise (the DreamPRM lower level in miniature).

    Data: ``x ~ N(0, I_D)``, clean target ``y* = sigmoid(teacher(x))``. Domain ``d`` of ``K``
    has noisy labels ``clip(y* + sigma_d e, 0, 1)`` with ``sigma_d = 0.5 d / (K - 1)``; the last
    domain's labels are also flipped (``1 - y``), so a good reweighting downweights it.
    Inner: :func:`weighted_mse` of ``sigmoid(mlp(x))``; outer: plain MSE on clean meta data.
    """
    k_teacher, k_params = jax.random.split(jax.random.PRNGKey(seed))
    kt1, kt2, kp1, kp2 = jax.random.split(jax.random.fold_in(k_teacher, 1), 4)
    teacher = {"fc1": _dense_init(kt1, in_dim, hidden, dtype), "fc2": _dense_init(kt2, hidden, 1, dtype)}
    teacher["fc1"]["bias"] = jax.random.normal(kp2, (hidden,), dtype) * 0.1
    params = {"fc1": _dense_init(kp1, in_dim, hidden, dtype), "fc2": _dense_init(k_params, hidden, 1, dtype)}
    noise = jnp.linspace(0.0, 0.5, num_domains).astype(dtype)  # [K]
    optimizer = _optimizer(inner_lr, optimizer)

    def inner_loss(p, alpha, batch):
        probs = jax.nn.sigmoid(mlp_logits(p, batch["x"]))  # [B]
        return weighted_mse(probs, batch["labels"], batch["domain_ids"], alpha, batch["sample_mask"])

    def outer_loss(p, batch):
        probs = jax.nn.sigmoid(mlp_logits(p, batch["x"]))  # [B]
        return jnp.mean(jnp.square(probs - batch["labels"]))

    def sample_batches(rng):
        kx, kd, ke, ko = jax.random.split(rng, 4)
        x = jax.random.normal(kx, (inner_steps, batch_size, in_dim), dtype)  # [T, B, D]
        d = jax.random.randint(kd, (inner_steps, batch_size), 0, num_domains)  # [T, B]
        clean = jax.nn.sigmoid(mlp_logits(teacher, x))  # [T, B]
        y = jnp.clip(clean + noise[d] * jax.random.normal(ke, clean.shape, dtype), 0.0, 1.0)
        y = jnp.where(d == num_domains - 1, 1.0 - y, y) if num_domains > 1 else y
        inner = {"x": x, "labels": y, "domain_ids": d.astype(jnp.int32), "sample_mask": jnp.ones_like(y)}
        xo = jax.random.normal(ko, (outer_batch_size, in_dim), dtype)  # [M, D]
        return inner, {"x": xo, "labels": jax.nn.sigmoid(mlp_logits(teacher, xo))}

    return Problem("mlp", inner_loss, outer_loss, params, optimizer, optimizer.init(params),
                   init_raw_weights(num_domains, dtype), sample_batches, num_domains, inner_steps,
                   "2-layer MLP, weighted MSE over noisy domains; clean meta MSE")


# ----------------------------------------------------------------------------- tiny transformer

def transformer_logits(params, tokens, mask):
    """One pre-norm self-attention block + MLP, score of the last real token.

    ``tokens [B, L] int32``, ``mask [B, L]`` (1 real, 0 pad, left-aligned) -> ``[B]`` logits.
    """
    x = params["embed"][tokens] + params["pos"][None, : tokens.shape[1]]  # [B, L, E]
    e = x.shape[-1]
    nh = params["heads"].shape[0]
    hd = e // nh

    def norm(h):
        return h * jax.lax.rsqrt(jnp.mean(jnp.square(h), -1, keepdims=True) + 1e-6)

    h = norm(x)
    qkv = h @ params["qkv"]  # [B, L, 3E]
    q, k, v = jnp.split(qkv, 3, axis=-1)
    q, k, v = (t.reshape(*t.shape[:2], nh, hd) for t in (q, k, v))  # [B, L, nh, hd]
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)  # [B, nh, L, L]
    L = tokens.shape[1]
    allowed = jnp.tril(jnp.ones((L, L), bool))[None, None] & (mask[:, None, None, :] > 0)  # [B, 1, L, L]
    s = jnp.where(allowed, s, -1e9)
    a = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, -1), v).reshape(x.shape)  # [B, L, E]
    x = x + a @ params["proj"]
    x = x + jnp.tanh(norm(x) @ params["fc1"]) @ params["fc2"]  # [B, L, E]
    last = jnp.maximum(jnp.sum(mask, -1).astype(jnp.int32) - 1, 0)  # [B]
    hl = jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]  # [B, E]
    return (norm(hl) @ params["head"])[..., 0] * params["heads"].sum() / nh  # [B]


def tiny_transformer(*, seed: int = 0, dtype=jnp.float32, num_domains: int = 3, inner_steps: int = 3,
                     inner_lr: float = 1e-3, batch_size: int = 8, seq_len: int = 8, vocab: int = 16,
                     embed: int = 16, num_heads: int = 2, num_chains: int = 3, num_steps_per_chain: int = 3,
                     optimizer: optax.GradientTransformation | None = None) -> Problem:
    """A PRM in miniature: token sequences -> last-token logit.

    Inner: :func:`weighted_mse` of sigmoid scores vs accuracy labels of random domains.
    Outer: :func:`aggregation_loss` over ``M`` chains of ``S`` step prefixes (prefix ``s`` of a
    chain is its first ``L * (s+1) / S`` tokens), labels = a parity rule of the chain.
    """
    ks = jax.random.split(jax.random.PRNGKey(seed), 8)
    n = lambda k, shape, scale: jax.random.normal(k, shape, dtype) * scale
    params = {
        "embed": n(ks[0], (vocab, embed), 1.0), "pos": n(ks[1], (seq_len, embed), 0.1),
        "qkv": n(ks[2], (embed, 3 * embed), embed ** -0.5), "proj": n(ks[3], (embed, embed), embed ** -0.5),
        "fc1": n(ks[4], (embed, 2 * embed), embed ** -0.5), "fc2": n(ks[5], (2 * embed, embed), (2 * embed) ** -0.5),
        "head": n(ks[6], (embed, 1), embed ** -0.5), "heads": jnp.ones((num_heads,), dtype),
    }
    optimizer = _optimizer(inner_lr, optimizer)

    def inner_loss(p, alpha, batch):
        probs = jax.nn.sigmoid(transformer_logits(p, batch["input_ids"], batch["attention_mask"]))  # [B]
        return weighted_mse(probs, batch["labels"], batch["domain_ids"], alpha, batch["sample_mask"])

    def outer_loss(p, batch):
        m, s = batch["step_mask"].shape
        z = transformer_logits(p, batch["input_ids"], batch["attention_mask"]).reshape(m, s)  # [M, S]
        return aggregation_loss(z, batch["step_mask"], batch["labels"], batch["chain_mask"], reduce="mean")

    def sample_batches(rng):
        k1, k2, k3, k4, k5 = jax.random.split(rng, 5)
        tok = jax.random.randint(k1, (inner_steps, batch_size, seq_len), 0, vocab)  # [T, B, L]
        lens = jax.random.randint(k2, (inner_steps, batch_size), 2, seq_len + 1)  # [T, B]
        am = (jnp.arange(seq_len) < lens[..., None]).astype(jnp.int32)  # [T, B, L]
        dom = jax.random.randint(k3, (inner_steps, batch_size), 0, num_domains)  # [T, B]
        acc = jax.random.uniform(k4, (inner_steps, batch_size), dtype)
        inner = {"input_ids": tok, "attention_mask": am, "domain_ids": dom.astype(jnp.int32),
                 "labels": acc, "sample_mask": jnp.ones_like(acc)}
        chains = jax.random.randint(k5, (num_chains, seq_len), 0, vocab)  # [M, L]
        plen = (seq_len * (jnp.arange(num_steps_per_chain) + 1)) // num_steps_per_chain  # [S]
        ids = jnp.repeat(chains, num_steps_per_chain, axis=0)  # [M*S, L]
        pm = (jnp.arange(seq_len)[None] < jnp.tile(plen, num_chains)[:, None]).astype(jnp.int32)  # [M*S, L]
        outer = {"input_ids": ids, "attention_mask": pm,
                 "step_mask": jnp.ones((num_chains, num_steps_per_chain), dtype),
                 "labels": (jnp.sum(chains, -1) % 2).astype(dtype), "chain_mask": jnp.ones((num_chains,), dtype)}
        return inner, outer

    return Problem("tiny_transformer", inner_loss, outer_loss, params, optimizer, optimizer.init(params),
                   init_raw_weights(num_domains, dtype), sample_batches, num_domains, inner_steps,
                   "1-block causal transformer scoring last token; weighted MSE inner, aggregation meta loss")


# ----------------------------------------------------------------------------- quadratic

def quadratic(*, seed: int = 0, dtype=jnp.float32, num_domains: int = 3, inner_steps: int = 5,
              inner_lr: float = 0.1, dim: int = 6, optimizer: optax.GradientTransformation | None = None) -> Problem:
    """Strongly convex quadratic inner problem with a closed-form implicit hypergradient.

    ``L_in(phi, a) = 0.5 phi^T A phi - phi^T B a`` (``A`` SPD, eigenvalues in [1, 4]),
    ``L_out(phi) = 0.5 ||phi - c||^2``. Then ``H = A``, ``d2 L_in / d a d phi = -B^T`` and the
    implicit hypergradient (6) at any ``phi`` is ``B^T A^{-1} (phi - c)``. Batches are unused
    placeholders (``[T]`` zeros). Default optimizer: SGD with ``inner_lr``.
    """
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(seed), 4)
    qmat, _ = jnp.linalg.qr(jax.random.normal(k1, (dim, dim), dtype))
    A = (qmat * jnp.linspace(1.0, 4.0, dim).astype(dtype)) @ qmat.T  # [D, D] SPD
    B = jax.random.normal(k2, (dim, num_domains), dtype)  # [D, K]
    c = jax.random.normal(k3, (dim,), dtype)
    params = jax.random.normal(k4, (dim,), dtype)
    optimizer = optimizer if optimizer is not None else optax.sgd(inner_lr)

    def inner_loss(p, a, batch):
        return 0.5 * p @ A @ p - p @ (B @ a) + 0.0 * jnp.sum(batch)

    def outer_loss(p, batch):
        return 0.5 * jnp.sum(jnp.square(p - c)) + 0.0 * jnp.sum(batch)

    def sample_batches(rng):
        return jnp.zeros((inner_steps,), dtype), jnp.zeros((), dtype)

    prob = Problem("quadratic", inner_loss, outer_loss, params, optimizer, optimizer.init(params),
                   jnp.zeros((num_domains,), dtype), sample_batches, num_domains, inner_steps,
                   "strongly convex quadratic with closed-form implicit hypergradient")
    return prob


def quadratic_closed_form(problem: Problem, params) -> jax.Array:
    """Closed-form implicit hypergradient of :func:`quadratic` at ``params``: ``B^T A^{-1} (phi - c)``."""
    A = jax.hessian(problem.inner_loss)(params, problem.alpha, jnp.zeros(()))
    mixed = jax.jacfwd(jax.grad(problem.inner_loss), argnums=1)(params, problem.alpha, jnp.zeros(()))  # [D, K] = -B
    v = jax.grad(problem.outer_loss)(params, jnp.zeros(()))
    return -mixed.T @ jnp.linalg.solve(A, v)


def central_fd(prob: Problem, batches, h: float = 1e-5) -> np.ndarray:
    """Central finite differences of the unrolled objective ``alpha -> L_out(unroll(alpha))``
    over every coordinate of ``prob.alpha`` (any pytree; flattened in ``ravel_pytree`` order).
    Meant for float64 problems."""
    inner, outer = batches
    flat, unravel = ravel_pytree(prob.alpha)

    @jax.jit
    def objective(a):
        params, _, _ = unroll(prob.inner_loss, prob.optimizer, prob.params, prob.opt_state, unravel(a), inner)
        return prob.outer_loss(params, outer)

    a0 = np.asarray(flat)
    out = np.zeros_like(a0)  # [num alpha coordinates]
    for i in range(a0.size):
        e = np.zeros_like(a0)
        e[i] = h
        out[i] = (float(objective(a0 + e)) - float(objective(a0 - e))) / (2 * h)
    return out
