"""Hypergradient methods against ``exact`` at checkpoints of a real training run.

A run directory written by ``python -m experiments.train`` holds ``checkpoints/`` (orbax,
:mod:`dreamprm_jax.train.checkpointing`) whose ``extra`` carries the run's configuration and
its samplers' positions. The audit rebuilds the run the way the trainer does
(:func:`~dreamprm_jax.train.demo.resolve_data`, :func:`~dreamprm_jax.train.demo.resolve_model`,
:func:`~dreamprm_jax.train.loop.build_batch_sources`, :func:`~dreamprm_jax.train.step.make_losses`,
:func:`~dreamprm_jax.train.step.inner_optimizer`) and, at the checkpoints nearest to the
start, 1/4, 1/2 and the end of the run, restores the state (parameters, inner AdamW state,
raw domain weights) and the samplers, draws the next ``draws`` (T inner batches, meta batch)
pairs the run would have trained on, and computes every method's hypergradient
``dL_meta/dr`` from that state. Each one is compared with ``exact``
(:func:`dreamprm_jax.bilevel.compare.agreement`: cosine, relative error, share of the K
domains whose sign agrees) and timed per call after compilation.

The trainer never saves step 0; the start of the run is its initial state rebuilt from
its configuration and seed (same parameters, every weight 1, fresh optimizer states).

Runs with instance weights (``--weighting instance_table | instance_net``) are audited the
same way, on the run's upper-level variable: the table ``[N]`` or the net's parameters. A
batch reaches only the table entries of the records it holds, so for the table the metrics
compare those entries alone (the others are exactly 0 for every method), and the saved
hypergradient is the sum per domain ``[K]`` (as the trainer logs it); for the net, every
parameter, flattened.

``exact`` is exact for the T-step unrolled objective ``L_meta(phi_T(r))``: it differentiates
through the T inner AdamW steps the run takes per iteration, not through the whole
training trajectory, so the short-horizon bias of stopping at T remains (Wu et al.,
"Understanding Short-Horizon Bias in Stochastic Meta-Optimization", ICLR 2018).

Paths in the saved configuration (``data_dir``, ``cache_dir``, ``train_json``, ...) are
read as the run wrote them: relative ones resolve against the current directory, so
audit from the directory the training ran in. The audit runs on one device.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Sequence

import jax
import numpy as np

from dreamprm_jax import bilevel
from dreamprm_jax.bilevel.compare import agreement, flatten
from dreamprm_jax.configs import TrainConfig
from dreamprm_jax.train import demo, loop
from dreamprm_jax.train import step as step_lib
from dreamprm_jax.train.checkpointing import Checkpointer, abstract_like
from dreamprm_jax.train.run_dir import saved_config

__all__ = ["RunAudit", "CheckpointAudit", "MethodAudit", "audit_run", "select_steps", "format_audit",
           "plot_audit", "REFERENCE", "FRACTIONS"]

REFERENCE = "exact"
#: Where in the run the audit looks: start, a quarter, half, end.
FRACTIONS = (0.0, 0.25, 0.5, 1.0)


@dataclasses.dataclass(frozen=True)
class MethodAudit:
    """One method at one checkpoint, over the draws (lists are per draw)."""

    cosine: list[float]
    rel_err: list[float]
    sign_agree: list[float]  # share of the compared entries (the K domains) whose sign agrees with exact
    finite: list[bool]
    time_s: float  # median wall time per call after compilation, over draws x repeats
    hypergradient: list[list[float]]  # [draws][K]; the table: per-domain sums [K]; the net: its parameters


@dataclasses.dataclass(frozen=True)
class CheckpointAudit:
    step: int
    source: str  # "checkpoint" or "initial" (rebuilt from the config and seed)
    methods: dict[str, MethodAudit]


@dataclasses.dataclass(frozen=True)
class RunAudit:
    run_dir: str
    trained_method: str  # the run's own --hypergradient
    unroll: int  # T
    weighting: str  # the run's --weighting: what the hypergradient is taken with respect to
    domains: list[str]
    draws: int
    method_options: dict[str, dict]
    device: str
    checkpoints: list[CheckpointAudit]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def select_steps(available: Sequence[int], fractions: Sequence[float] = FRACTIONS) -> list[int]:
    """For each fraction of the last step, the nearest of ``available`` or 0 (the initial
    state), ascending without repeats."""
    candidates = sorted(set(int(s) for s in available) | {0})
    last = candidates[-1]
    chosen = {min(candidates, key=lambda s: (abs(s - f * last), s)) for f in fractions}
    return sorted(chosen)


def _method_options(methods: Sequence[str], options: dict[str, dict], cfg: TrainConfig) -> dict[str, dict]:
    """``options`` per method; the run's own method also gets the run's options (they win)."""
    out = {m: dict(options.get(m, {})) for m in methods}
    if cfg.hypergradient in out:
        out[cfg.hypergradient].update(cfg.hypergradient_kwargs())
    return out


def audit_run(run_dir: str, methods: Sequence[str], *, draws: int = 2, repeats: int = 3,
              method_options: dict[str, dict] | None = None, steps: Sequence[int] | None = None,
              progress: bool = False) -> RunAudit:
    """Compare ``methods`` with ``exact`` at checkpoints of the run in ``run_dir``.

    Args:
      run_dir: a directory written by ``python -m experiments.train`` with ``checkpoints/``.
      methods: names in ``bilevel.METHODS``; ``exact`` is added first when missing.
      draws: (T inner batches, meta batch) draws per checkpoint, continuing the run's samplers.
      repeats: timed calls per method and draw after a first, compiling, call.
      method_options: per-method options (``{"darts": {"R": 0.01}}``); the run's own method
        also gets the run's ``--hypergradient-options``.
      steps: checkpoint steps to audit (0 = the initial state); default :func:`select_steps`.

    Raises:
      FileNotFoundError: no committed checkpoint under ``run_dir/checkpoints`` (or a step
        in ``steps`` that is not one).
      ValueError: an unknown method.
    """
    methods = list(dict.fromkeys([REFERENCE, *methods]))
    unknown = [m for m in methods if m not in bilevel.METHODS]
    if unknown:
        raise ValueError(f"audit_run: unknown method(s) {unknown}; expected some of {sorted(bilevel.METHODS)}")
    if draws < 1 or repeats < 1:
        raise ValueError(f"audit_run: expected draws >= 1 and repeats >= 1, got {draws}, {repeats}")
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    cfg, available = saved_config(run_dir)
    cfg = dataclasses.replace(cfg, progress=progress)
    with Checkpointer(ckpt_dir, keep=None) as checkpointer:
        steps = select_steps(available) if steps is None else sorted(set(int(s) for s in steps))
        missing = [s for s in steps if s != 0 and s not in available]
        if missing:
            raise FileNotFoundError(f"{ckpt_dir}: no checkpoint for step(s) {missing} (have {available})")

        # --- the run rebuilt as the trainer builds it ------------------------------------
        data = demo.resolve_data(cfg).data
        model = demo.resolve_model(cfg, data)
        model_config, params = model.config, model.params
        sources = loop.build_batch_sources(cfg, model_config, model.processor, data)
        domains = list(sources.train_table.domains)
        optimizer = step_lib.inner_optimizer(cfg.inner_lr, cfg.inner_lr_step_size, cfg.inner_lr_gamma,
                                             cfg.inner_weight_decay, cfg.inner_grad_clip)
        meta_opt = step_lib.meta_optimizer(cfg.meta_lr, cfg.meta_weight_decay, cfg.meta_lr_warmup, cfg.meta_grad_clip,
                                           cfg.meta_second_moment)
        record_domains = np.asarray(sources.train_table.samples["domain_id"], np.int32)  # [N]
        upper = step_lib.init_upper(cfg.weighting, num_domains=len(domains), num_records=len(record_domains),
                                    max_weight=cfg.instance_max_weight, hidden=cfg.instance_net_hidden, seed=cfg.seed)
        # committed to the device like a restored state, so both hit one compiled program per method
        initial = jax.device_put(step_lib.init_state(params, len(domains), optimizer, meta_opt, raw_weights=upper),
                                 jax.devices()[0])
        del params
        inner_loss, outer_loss = step_lib.make_losses(model_config, cfg.aggregation, cfg.meta_loss, cfg.weighting,
                                                      cfg.instance_max_weight, cfg.instance_normalize)
        options = _method_options(methods, method_options or {}, cfg)
        fns = {m: jax.jit(functools.partial(bilevel.hypergradient, m, inner_loss, outer_loss, optimizer, **options[m]))
               for m in methods}

        results = []
        for step in steps:
            if step == 0 and 0 not in available:
                state, source = initial, "initial"
                train_position, meta_position = None, None
            else:
                state, step_extra = checkpointer.restore(step, abstract_like(initial))
                source = "checkpoint"
                train_position, meta_position = step_extra["train_sampler"], step_extra["meta_sampler"]
            results.append(_audit_state(state, step, source, sources, train_position, meta_position, cfg,
                                        model_config, record_domains, fns, draws, repeats, progress))
    return RunAudit(run_dir=run_dir, trained_method=cfg.hypergradient, unroll=cfg.unroll, weighting=cfg.weighting,
                    domains=domains,
                    draws=draws, method_options=options, device=jax.devices()[0].device_kind, checkpoints=results)


def _compared_entries(weighting: str, inner_batches) -> np.ndarray | None:
    """The table entries the batches reach (records of real rows), else None (every entry)."""
    if weighting != "instance_table":
        return None
    ids = np.asarray(inner_batches.record_ids)  # [T, B]
    return np.unique(ids[np.asarray(inner_batches.sample_mask) > 0])


def _reported(weighting: str, g, record_domains: np.ndarray, num_domains: int) -> np.ndarray:
    """What is saved of a hypergradient: ``[K]`` (domain), per-domain sums ``[K]`` (table), flat (net)."""
    flat = flatten(g)
    if weighting == "instance_table":
        return np.bincount(record_domains, weights=flat, minlength=num_domains)  # [K]
    return flat


def _audit_state(state, step: int, source: str, sources: loop.BatchSources, train_position, meta_position,
                 cfg: TrainConfig, model_config, record_domains: np.ndarray, fns: dict, draws: int, repeats: int,
                 progress: bool) -> CheckpointAudit:
    """Every method at one state over ``draws`` batch draws continuing the run's samplers."""
    train_sampler, meta_sampler = sources.train_sampler, sources.meta_sampler
    if train_position is None:  # the samplers at their start, as the run began
        train_sampler.load_state_dict({"epoch": 0, "position": 0, "seed": train_sampler.seed})
        meta_sampler.load_state_dict({"epoch": 0, "position": 0, "seed": meta_sampler.seed})
    else:
        train_sampler.load_state_dict(train_position)
        meta_sampler.load_state_dict(meta_position)
    per_method: dict[str, dict[str, list]] = {m: {"agreement": [], "times": [], "g": []} for m in fns}
    for draw in range(draws):
        inner_batches, _ = sources.train_builder.stacked_train([train_sampler.next() for _ in range(cfg.unroll)])
        meta_batch, _ = sources.meta_builder.meta_batch(meta_sampler.next())
        if cfg.weighting == "instance_net":  # the net's feature, as the trainer computes it
            inner_batches = step_lib.with_record_loss(model_config, state["params"], inner_batches)
        entries = _compared_entries(cfg.weighting, inner_batches)
        args = (state["params"], state["opt_state"], state["raw_weights"], inner_batches, meta_batch)
        grads = {}
        for method, fn in fns.items():
            t0 = time.perf_counter()
            g, _ = jax.block_until_ready(fn(*args))  # compiles on the first draw of each shape
            if progress:
                print(f"[audit] step {step} draw {draw} {method}: first call {time.perf_counter() - t0:.2f} s",
                      flush=True)
            for _ in range(repeats):
                t0 = time.perf_counter()
                jax.block_until_ready(fn(*args))
                per_method[method]["times"].append(time.perf_counter() - t0)
            grads[method] = flatten(g)
            per_method[method]["g"].append(_reported(cfg.weighting, g, record_domains,
                                                     len(sources.train_table.domains)).tolist())
        for method, g in grads.items():
            ref = grads[REFERENCE]
            if entries is not None:
                g, ref = g[entries], ref[entries]
            per_method[method]["agreement"].append(agreement(g, ref))
    methods = {}
    for method, r in per_method.items():
        agree = r["agreement"]
        methods[method] = MethodAudit(cosine=[a.cosine for a in agree], rel_err=[a.rel_err for a in agree],
                                      sign_agree=[a.sign_agree for a in agree], finite=[a.finite for a in agree],
                                      time_s=float(np.median(r["times"])), hypergradient=r["g"])
    return CheckpointAudit(step=step, source=source, methods=methods)


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def format_audit(audit: RunAudit) -> str:
    """A table: one row per checkpoint and method (means over draws)."""
    header = f"{'step':>7s} {'method':14s} {'cosine':>8s} {'rel_err':>9s} {'sign':>6s} {'finite':>6s} {'ms/call':>9s}"
    lines = [f"run {audit.run_dir}: trained with {audit.trained_method}, T={audit.unroll}, K={len(audit.domains)}, "
             f"weighting {audit.weighting}, {audit.draws} draw(s) per checkpoint, device {audit.device}",
             "(exact is exact for the T-step unrolled objective; the short-horizon bias of stopping at T remains)",
             header, "-" * len(header)]
    for c in audit.checkpoints:
        for method, m in c.methods.items():
            step = f"{c.step}" + ("*" if c.source == "initial" else "")
            lines.append(f"{step:>7s} {method:14s} {_mean(m.cosine):8.4f} {_mean(m.rel_err):9.2e} "
                         f"{_mean(m.sign_agree):6.2f} {np.mean(m.finite):6.2f} {1e3 * m.time_s:9.2f}")
    if audit.weighting == "instance_table":
        lines.append("(instance table: metrics over the entries of the records each draw's batches hold)")
    if any(c.source == "initial" for c in audit.checkpoints):
        lines.append("* the initial state rebuilt from the run's config and seed")
    return "\n".join(lines)


def plot_audit(audit: RunAudit, path: str) -> str:
    """Cosine and sign agreement with exact against the checkpoint step, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [c.step for c in audit.checkpoints]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for method in audit.checkpoints[0].methods:
        axes[0].plot(steps, [_mean(c.methods[method].cosine) for c in audit.checkpoints], marker="o", label=method)
        axes[1].plot(steps, [_mean(c.methods[method].sign_agree) for c in audit.checkpoints], marker="o", label=method)
    axes[0].set_ylabel("cosine similarity to exact")
    axes[0].set_ylim(-1.05, 1.05)
    axes[1].set_ylabel("share of domains with exact's sign" if audit.weighting == "domain"
                       else "share of entries with exact's sign")
    axes[1].set_ylim(-0.05, 1.05)
    for ax in axes:
        ax.set_xlabel("training iteration (checkpoint)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle(f"{os.path.basename(os.path.normpath(audit.run_dir))}: T={audit.unroll}, K={len(audit.domains)}, "
                 f"trained with {audit.trained_method}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
