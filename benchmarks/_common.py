"""Shared pieces of the benchmarks: timing, versions, JSON, generated DreamPRM batches, FLOP counts.

Nothing here imports torch; :mod:`benchmarks.reference_torch` does.

Generated problem (:func:`make_problem`): random token ids and random 'images' (patch rows
of a ``image_side`` px square), in the exact layout the trainer feeds the model:

* a training row is ``<vision_start> <image_pad> * n <vision_end> text`` with a random length
  in ``[min_fill L, L]`` (so rows need padding), **left**-padded to ``L`` with id 0 /
  mask 0. Left padding makes DreamPRM's ``logits[:, -1]`` (the reference) and the JAX
  PRM's mask-based last token the same position;
* a meta chain of ``S`` steps gives ``S`` step-prefix rows (chain-major): the same image
  and question, then steps ``1..s`` (each ``step_len`` tokens), then ``template_len`` fixed
  tokens (the chat template's ``<|im_end|>\n<|im_start|>assistant\n`` after every prefix),
  left-padded to ``L_meta``; ``meta_jax_packed`` is the same meta batch packed one row per
  chain (``data.batching.pack_chain``: the image once, the shared tokens once, the template
  tails as branches), which scores the same;
* labels: Monte-Carlo accuracies in ``{0, .25, .5, .75, 1}`` for training rows, 0/1 for
  chains; domain ids uniform in ``[0, K)``.

Each batch is kept twice: ``hf`` (numpy, transformers-style inputs + labels, for the
PyTorch reference) and ``jax`` (``data.types.TrainBatch`` / ``MetaBatch`` over
``qwen2_vl.prepare_batch``; the ``T`` inner batches stacked on a leading axis), built from the
same arrays.
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import statistics
import time
from typing import Any, Callable

import numpy as np

from dreamprm_jax.utils import jsonable

# ------------------------------------------------------------------------------ timing


def time_calls(fn: Callable[[], Any], warmup: int, repeats: int) -> dict:
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` times timed (``fn`` must block).

    Returns ``{"median_s", "min_s", "max_s", "iqr_s", "spread_pct", "times_s"}``; ``spread_pct``
    is ``100 * (max - min) / median``.
    """
    return time_interleaved({"run": fn}, warmup, repeats)["run"]


def summarize_times(times: list[float]) -> dict:
    """``{"median_s", "min_s", "max_s", "iqr_s", "spread_pct", "times_s"}`` of a list of seconds."""
    med = statistics.median(times)
    q = np.percentile(times, [25, 75]) if len(times) > 1 else (times[0], times[0])
    return {"median_s": med, "min_s": min(times), "max_s": max(times), "iqr_s": float(q[1] - q[0]),
            "spread_pct": 100.0 * (max(times) - min(times)) / med, "times_s": list(times)}


def time_interleaved(fns: dict[str, Callable[[], Any]], warmup: int, repeats: int,
                     clock: Callable[[], float] = time.perf_counter, shuffle_seed: int | None = None
                     ) -> dict[str, dict]:
    """Time several runs round-robin: each round calls every ``fn`` once (each must block).

    On a shared machine the load changes over seconds; timing run A's repeats, then B's, lets
    a change land on one run only and moves the A / B ratio by tens of percent. Here round
    ``r`` calls the runs in the given order rotated by ``r`` (no run always goes first, right
    after another's clean-up), so every run sees the same load, and ``times_s[r]`` of two
    runs are paired: :func:`paired_ratio` divides them round by round.

    A rotation keeps every run behind the same other run; with ``shuffle_seed`` each timed round
    takes a fresh random order instead (``numpy.random.default_rng(shuffle_seed)``), so neither a
    position nor a predecessor (whose caches and threads a run inherits) stays with one run.

    ``warmup`` untimed rounds first (the first call of each run happens in the given order).
    Returns ``{name: summarize_times(...)}``.
    """
    names = list(fns)
    for w in range(warmup):
        k = w % len(names)
        for name in names[k:] + names[:k]:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    rng = None if shuffle_seed is None else np.random.default_rng(shuffle_seed)
    for r in range(max(1, repeats)):
        k = r % len(names)
        order = names[k:] + names[:k] if rng is None else [names[i] for i in rng.permutation(len(names))]
        for name in order:
            t0 = clock()
            fns[name]()
            times[name].append(clock() - t0)
    return {name: summarize_times(t) for name, t in times.items()}


def paired_ratio(numerator: dict, denominator: dict) -> float:
    """Median over rounds of ``numerator.times_s[r] / denominator.times_s[r]`` (timings of
    :func:`time_interleaved`, same round count)."""
    a, b = numerator["times_s"], denominator["times_s"]
    if len(a) != len(b):
        raise ValueError(f"paired_ratio: {len(a)} and {len(b)} rounds; both timings must come from one "
                         "time_interleaved call")
    return float(statistics.median(x / y for x, y in zip(a, b)))


def median_interval(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """``(lo, hi, coverage)``: a distribution-free confidence interval of the median of ``values``.

    With the ``n`` values sorted, ``[x_(k), x_(n+1-k)]`` (1-based) covers the true median with
    probability ``1 - 2 P(Bin(n, 1/2) < k)`` whatever the distribution (independent draws); ``k``
    is the largest whose coverage is at least ``level``. Where even ``k = 1`` (the range) covers
    less (``n < 6`` at 95 %), the range is returned with its smaller coverage. For per-round time
    ratios this is the noise of :func:`paired_ratio`: two runs are equal within noise where the
    interval contains 1.
    """
    if not values:
        raise ValueError("median_interval: no values")
    x = sorted(values)
    n = len(x)

    def coverage(k):
        return 1.0 - 2.0 * sum(math.comb(n, i) for i in range(k)) / 2.0 ** n

    k = 1
    while k + 1 <= (n + 1) // 2 and coverage(k + 1) >= level:
        k += 1
    return x[k - 1], x[n - k], coverage(k)


def versions() -> dict:
    import jax

    out = {"jax": jax.__version__, "python": platform.python_version(), "machine": platform.machine(),
           "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
           "backend": jax.default_backend(), "device": str(jax.devices()[0]),
           "device_kind": getattr(jax.devices()[0], "device_kind", ""),
           "load_average_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    try:
        import jaxlib

        out["jaxlib"] = jaxlib.__version__
    except Exception:  # pragma: no cover
        pass
    return out


def write_json(path: str, obj: dict) -> str:
    """Benchmark results as strict JSON; a non-finite number (a failed timing) is written as null."""
    return jsonable.write_json(path, obj, nonfinite="null")


# ------------------------------------------------------------------------------ problem


@dataclasses.dataclass(frozen=True)
class ProblemSpec:
    """Shapes of one generated bi-level iteration (see the module docstring)."""

    batch: int = 8  # B training rows per inner step
    seq_len: int = 64  # L training bucket
    unroll: int = 5  # T inner steps
    meta_chains: int = 8  # M
    meta_steps: int = 5  # S step prefixes per chain
    step_len: int = 8  # tokens per reasoning step in a meta chain
    template_len: int = 5  # chat-template tokens closing every step prefix
    question_len: int = 16  # question tokens of a meta chain (besides the image)
    image_side: int = 56  # px, multiple of 28; 0 = text only
    num_domains: int = 4  # K
    seed: int = 0
    min_fill: float = 0.6  # training rows hold between min_fill * L and L real tokens

    @property
    def meta_seq_len(self) -> int:
        return 3 + self.image_tokens + self.question_len + self.meta_steps * self.step_len + self.template_len

    @property
    def packed_meta_seq_len(self) -> int:
        return self.meta_seq_len + (self.meta_steps - 1) * self.template_len

    @property
    def grid(self) -> int:
        return self.image_side // 14

    @property
    def image_tokens(self) -> int:
        return self.grid * self.grid // 4 if self.image_side else 0


def _special(config) -> tuple[int, int, int]:
    return config.vision_start_token_id, config.image_token_id, config.vision_end_token_id


def _text_ids(config, rng, n: int) -> np.ndarray:
    """Random ordinary token ids (never a special id, never the pad id 0)."""
    specials = {config.image_token_id, config.video_token_id, config.vision_start_token_id,
                config.vision_end_token_id}
    hi = min(config.text.vocab_size, min(specials))
    if hi <= 2:
        raise ValueError(f"benchmarks._common: vocabulary {config.text.vocab_size} leaves no ordinary ids below "
                         f"the special ids {sorted(specials)}")
    return rng.integers(2, hi, size=n)


def _rows_to_batch(config, rows: list[np.ndarray], pixels: list[np.ndarray | None], grids: list, L: int) -> dict:
    """Left-pad ``rows`` to ``L``; HF-style numpy inputs (pixel rows in batch order)."""
    B = len(rows)
    ids = np.zeros((B, L), np.int64)
    mask = np.zeros((B, L), np.int64)
    for b, r in enumerate(rows):
        if len(r) > L:
            raise ValueError(f"benchmarks._common: row {b} has {len(r)} tokens > bucket {L}")
        ids[b, L - len(r):] = r
        mask[b, L - len(r):] = 1
    out = {"input_ids": ids, "attention_mask": mask}
    if any(p is not None for p in pixels):
        out["pixel_values"] = np.concatenate([p for p in pixels if p is not None]).astype(np.float32)
        out["image_grid_thw"] = np.asarray([g for g in grids if g is not None], np.int64)
    return out


def _image(config, spec: ProblemSpec, rng):
    if not spec.image_side:
        return [], None, None
    g = spec.grid
    vs, img, ve = _special(config)
    head = np.array([vs] + [img] * spec.image_tokens + [ve])
    pix = rng.standard_normal((g * g, config.vision.patch_dim)).astype(np.float32)
    return head, pix, [1, g, g]


def to_jax_batch(config, hf: dict):
    """``qwen2_vl.prepare_batch`` of the HF-style inputs with the targets (numpy): a ``TrainBatch``
    when ``hf`` holds ``domain_ids``, else a ``MetaBatch``."""
    from dreamprm_jax.data.types import MetaBatch, TrainBatch
    from dreamprm_jax.models import qwen2_vl

    inputs = qwen2_vl.prepare_batch(config, hf["input_ids"], hf["attention_mask"], hf.get("pixel_values"),
                                    hf.get("image_grid_thw"))
    if "domain_ids" in hf:
        return TrainBatch(inputs, labels=hf["labels"], domain_ids=hf["domain_ids"], sample_mask=hf["sample_mask"])
    return MetaBatch(inputs, step_mask=hf["step_mask"], labels=hf["labels"], chain_mask=hf["chain_mask"])


def make_problem(config, spec: ProblemSpec) -> dict:
    """``{"inner_hf": [T dicts], "meta_hf": dict, "inner_jax": TrainBatch [T, ...], "meta_jax": MetaBatch,
    "inner_tokens": real tokens per inner batch [T], "meta_tokens": int}`` (all numpy)."""
    rng = np.random.default_rng(spec.seed)
    L = spec.seq_len
    head_len = 3 + spec.image_tokens if spec.image_side else 0
    inner_hf = []
    for _ in range(spec.unroll):
        rows, pixels, grids = [], [], []
        for _ in range(spec.batch):
            head, pix, grid = _image(config, spec, rng)
            lo = min(L - head_len, max(1, int(spec.min_fill * L) - head_len))
            n_text = int(rng.integers(lo, L - head_len + 1))
            rows.append(np.concatenate([head, _text_ids(config, rng, n_text)]).astype(np.int64))
            pixels.append(pix)
            grids.append(grid)
        hf = _rows_to_batch(config, rows, pixels, grids, L)
        hf["labels"] = rng.integers(0, 5, size=spec.batch).astype(np.float32) / 4.0
        hf["domain_ids"] = rng.integers(0, spec.num_domains, size=spec.batch).astype(np.int32)
        hf["sample_mask"] = np.ones(spec.batch, np.float32)
        inner_hf.append(hf)

    rows, pixels, grids = [], [], []
    template = _text_ids(config, np.random.default_rng(spec.seed + 1), spec.template_len)
    for _ in range(spec.meta_chains):
        head, pix, grid = _image(config, spec, rng)
        question = _text_ids(config, rng, spec.question_len)
        steps = [_text_ids(config, rng, spec.step_len) for _ in range(spec.meta_steps)]
        for s in range(1, spec.meta_steps + 1):
            rows.append(np.concatenate([head, question, *steps[:s], template]).astype(np.int64))
            pixels.append(pix)
            grids.append(grid)
    meta_hf = _rows_to_batch(config, rows, pixels, grids, spec.meta_seq_len)
    meta_hf["step_mask"] = np.ones((spec.meta_chains, spec.meta_steps), np.float32)
    meta_hf["labels"] = rng.integers(0, 2, size=spec.meta_chains).astype(np.float32)
    meta_hf["chain_mask"] = np.ones(spec.meta_chains, np.float32)

    inner_jax = [to_jax_batch(config, hf) for hf in inner_hf]
    from dreamprm_jax.data import batching

    stacked = batching.stack(inner_jax)  # [T, ...]
    return {
        "inner_hf": inner_hf,
        "meta_hf": meta_hf,
        "inner_jax": stacked,
        "meta_jax": to_jax_batch(config, meta_hf),
        "meta_jax_packed": _packed_meta(config, spec, rows, pixels, grids, meta_hf["labels"]),
        "inner_tokens": [int(hf["attention_mask"].sum()) for hf in inner_hf],
        "meta_tokens": int(meta_hf["attention_mask"].sum()),
    }


def _packed_meta(config, spec: ProblemSpec, rows, pixels, grids, labels):
    """The meta rows packed one row per chain by the trainer's own ``collate_meta(pack_chains=True)``."""
    from dreamprm_jax.data import batching

    S = spec.meta_steps
    samples = [batching.Sample(r.astype(np.int32), p, None if g is None else np.asarray(g, np.int64))
               for r, p, g in zip(rows, pixels, grids)]
    chains = [samples[m * S:(m + 1) * S] for m in range(spec.meta_chains)]
    patches = spec.meta_chains * spec.grid * spec.grid if spec.image_side else None
    bspec = batching.BatchSpec(spec.meta_chains, (spec.packed_meta_seq_len,), None if patches is None else (patches,),
                               pad_id=0, patch_dim=config.vision.patch_dim, padding_side="left", max_steps=S,
                               pack_chains=True)
    batch, _ = batching.collate_meta(chains, list(labels), bspec, batching.model_prepare_fn(config))
    return batch


# ------------------------------------------------------------------------------ FLOPs


def jaxpr_flops(closed_jaxpr) -> dict:
    """Matmul FLOPs of a (closed) jaxpr, loops multiplied out.

    XLA's ``compiled.cost_analysis()['flops']`` counts the body of every ``while`` loop
    once (checked on XLA:CPU with a 10-step ``lax.scan``: it reports one step). The model
    scans its layers and the engine scans its ``T`` inner steps, so that number undercounts
    by roughly ``T * num_layers``. This counter walks the jaxpr instead:

    * ``dot_general``: ``2 * prod(batch dims) * M * N * K``;
    * ``conv_general_dilated``: ``2 * prod(out) * prod(kernel spatial) * C_in / groups``;
    * ``scan``: body x ``length``; ``while`` from ``fori_loop`` with a static trip count:
      body x trip count; a ``while`` whose trip count is not static is counted once and
      reported in ``dynamic_while_loops``; ``cond``: the most expensive branch;
      every other higher-order primitive (pjit, custom_jvp/vjp, remat, ...): its sub-jaxprs.

    Elementwise work is ignored (model FLOPs are matmul FLOPs, as in MFU accounting).
    Returns ``{"flops", "dynamic_while_loops"}``.
    """
    from jax.extend import core as jcore

    dyn = [0]

    def sub_jaxprs(eqn):
        for v in eqn.params.values():
            for x in (v if isinstance(v, (tuple, list)) else (v,)):
                if isinstance(x, jcore.ClosedJaxpr):
                    yield x.jaxpr
                elif isinstance(x, jcore.Jaxpr):
                    yield x

    def count(jaxpr) -> float:
        total = 0.0
        for eqn in jaxpr.eqns:
            name = eqn.primitive.name
            if name == "dot_general":
                (lc, rc), (lb, _rb) = eqn.params["dimension_numbers"]
                a, b = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
                k = np.prod([a[i] for i in lc]) if lc else 1
                batch = np.prod([a[i] for i in lb]) if lb else 1
                m = np.prod([a[i] for i in range(len(a)) if i not in lc and i not in lb])
                n = np.prod([b[i] for i in range(len(b)) if i not in rc and i not in _rb])
                total += 2.0 * batch * m * n * k
            elif name == "conv_general_dilated":
                out = eqn.outvars[0].aval.shape
                rhs = eqn.invars[1].aval.shape
                dn = eqn.params["dimension_numbers"]
                rhs_spec = dn.rhs_spec  # (out_c, in_c, spatial...)
                spatial = np.prod([rhs[i] for i in rhs_spec[2:]])
                cin = rhs[rhs_spec[1]]
                total += 2.0 * np.prod(out) * spatial * cin
            elif name == "scan":
                total += eqn.params["length"] * count(eqn.params["jaxpr"].jaxpr)
            elif name == "while":
                body = count(eqn.params["body_jaxpr"].jaxpr)
                trips = _static_trip_count(eqn)
                if trips is None:
                    dyn[0] += 1
                    trips = 1
                total += trips * body
            elif name == "cond":
                total += max(count(b.jaxpr) for b in eqn.params["branches"])
            else:
                total += sum(count(j) for j in sub_jaxprs(eqn))
        return total

    flops = count(closed_jaxpr.jaxpr)
    return {"flops": float(flops), "dynamic_while_loops": dyn[0]}


def _static_trip_count(eqn) -> int | None:
    """Trip count of a ``fori_loop``-style while (``i < upper``, both literal), else None."""
    from jax.extend import core as jcore

    cond = eqn.params["cond_jaxpr"].jaxpr
    if len(cond.eqns) != 1 or cond.eqns[0].primitive.name != "lt":
        return None
    # fori_loop carries (i, upper, x); i and upper start as the while's first inputs.
    n_consts = eqn.params["cond_nconsts"] + eqn.params["body_nconsts"]
    init = eqn.invars[n_consts:]
    vals = []
    for v in init[:2]:
        if isinstance(v, jcore.Literal):
            vals.append(int(v.val))
        else:
            return None
    return max(0, vals[1] - vals[0])
