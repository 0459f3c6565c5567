"""Static-shape batches: bucketing, collation, stacking and a seeded, resumable sampler.

Shapes.  A batch's sequence length L is the smallest configured *sequence bucket* >= the
longest sequence, and its patch count N the smallest *patch bucket* >= the total number
of image patches in the batch (every sample carries its own copy of its image's patches,
in row order, because the model fills each sample's ``<|image_pad|>`` slots from them).
jit therefore compiles once per (L, N) pair that occurs, not once per batch.  Padding
waste is reported per batch::

    token_waste = 1 - (real tokens) / (B * L)      patch_waste = 1 - (real patches) / N

Batches (:mod:`dreamprm_jax.data.types`):

* train: :class:`TrainBatch`, the model inputs + ``labels`` [B] f32, ``domain_ids`` [B] i32,
  ``sample_mask`` [B] f32, ``record_ids`` [B] i32 (the row of each sample's record in the
  training table; 0 for dummy rows);
* meta: :class:`MetaBatch`, the model inputs over M*S step-prefix rows, chain-major (row
  ``m * S + s`` is step ``s + 1`` of chain ``m``) + ``step_mask`` [M, S] f32, ``labels`` [M]
  f32, ``chain_mask`` [M] f32, ``question_index`` [M] i32 (the chain's question, -1 for a
  dummy chain);
* T batches stacked: every array gets a leading ``[T, ...]`` axis; all T share one bucket.

Packed meta batches (``BatchSpec.pack_chains``).  A chain's S step prefixes share their
beginning (system prompt, image, question, the earlier steps), so scoring them as S rows
encodes the image S times and runs the shared tokens S times. :func:`pack_chain` puts them
in ONE row as a tree: the longest prefix is the trunk, and each shorter prefix contributes
only the tokens where it leaves the trunk (its chat-template tail, or more where the
tokenizer merged differently), inserted right after the shared part. ``branch_ids`` make
each tail visible only to itself (``qwen2_vl.text.attention_mask_bias``) and the position
ids are those each token has in its own prefix row, so every score equals the unpacked
one (up to float summation order): the model sees exactly the same sequences. The batch
then has M rows plus ``branch_ids`` [M, L] i32 and ``score_index`` [M, S] i32 (where each
step is read), and ``prm.score`` returns the same ``[M * S]`` scores as for M*S rows.

Empty slots (a short last batch, a chain with fewer than S steps, fewer than M chains)
are *dummy rows*: one pad token with attention 1 and no image.  A row with no attended
token would make a softmax over an all-masked row, i.e. NaN, and NaN * 0 = NaN in a
masked loss; one attended pad token keeps every number finite.  The mask zeroes it.

The model inputs (:class:`~dreamprm_jax.models.qwen2_vl.inputs.ModelInputs`) are built by the
model's host helper ``prepare_batch(config, input_ids, attention_mask, pixel_values,
image_grid_thw, num_patches=N)`` (:func:`model_prepare_fn`), or any function with the same
signature minus ``config`` that returns ``ModelInputs``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import numpy as np

from dreamprm_jax.data.types import MetaBatch, ModelInputs, TrainBatch

__all__ = [
    "Sample",
    "BatchSpec",
    "power_of_two_buckets",
    "choose_bucket",
    "collate",
    "collate_train",
    "collate_meta",
    "pack_chain",
    "stack",
    "stack_train",
    "stack_meta",
    "model_prepare_fn",
    "Sampler",
    "QuestionSampler",
    "BatchBuilder",
]


class Sample(NamedTuple):
    """One encoded sequence: input_ids int32 [L]; pixel_values f32 [P, D] | None; image_grid_thw int [3] | None."""

    input_ids: np.ndarray
    pixel_values: np.ndarray | None = None
    image_grid_thw: np.ndarray | None = None

    @property
    def num_patches(self) -> int:
        return 0 if self.pixel_values is None else int(self.pixel_values.shape[0])


def power_of_two_buckets(max_value: int, min_value: int = 16) -> tuple[int, ...]:
    """``(min_value, 2 * min_value, ..., first power-of-two multiple >= max_value)``."""
    if min_value <= 0 or max_value <= 0:
        raise ValueError(f"power_of_two_buckets: expected positive sizes, got min {min_value}, max {max_value}")
    out = [int(min_value)]
    while out[-1] < max_value:
        out.append(out[-1] * 2)
    return tuple(out)


def choose_bucket(size: int, buckets: Sequence[int], what: str = "size") -> int:
    """Smallest bucket >= ``size``; ``ValueError`` naming ``what`` when none is large enough."""
    for b in sorted(buckets):
        if b >= size:
            return int(b)
    raise ValueError(f"{what} {size} exceeds the largest bucket {max(buckets)}; expected a bucket list "
                     f"{sorted(buckets)} covering it (add a larger bucket or shorten the data)")


@dataclasses.dataclass(frozen=True)
class BatchSpec:
    """Static batch layout.

    Attributes:
      batch_size: B (train) or M (meta chains).
      seq_buckets: allowed sequence lengths L.
      patch_buckets: allowed patch counts N (``None``: text-only batches).
      pad_id: token id of padding (and of dummy rows).
      patch_dim: D, needed when a batch with image slots happens to hold no image.
      padding_side: ``"right"`` (default) or ``"left"``.
      max_steps: S of meta batches (``None``: the longest chain of each batch, bucketed by
        ``seq_buckets``-like ``step_buckets``).
      step_buckets: allowed S when ``max_steps`` is None (default: powers of two).
      pack_chains: meta batches put each chain's step prefixes in one packed row
        (:func:`pack_chain`) instead of one row per step.
    """

    batch_size: int
    seq_buckets: tuple[int, ...]
    patch_buckets: tuple[int, ...] | None = None
    pad_id: int = 0
    patch_dim: int | None = None
    padding_side: str = "right"
    max_steps: int | None = None
    step_buckets: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    pack_chains: bool = False

    def __post_init__(self):
        if self.padding_side not in ("right", "left"):
            raise ValueError(f"BatchSpec.padding_side: expected 'right' or 'left', got {self.padding_side!r}")
        if self.batch_size <= 0:
            raise ValueError(f"BatchSpec.batch_size: expected > 0, got {self.batch_size}")


def model_prepare_fn(config) -> Callable:
    """``prepare_batch`` of the Qwen2-VL model with ``config`` bound."""
    from dreamprm_jax.models import qwen2_vl

    return functools.partial(qwen2_vl.prepare_batch, config)


def _buckets_for(groups: Sequence[Sequence[Sample]], spec: BatchSpec) -> tuple[int, int | None]:
    """Common (L, N) buckets for several row groups (each group = one batch)."""
    max_len = max((len(s.input_ids) for g in groups for s in g), default=1)
    seq = choose_bucket(max(max_len, 1), spec.seq_buckets, "sequence length")
    if spec.patch_buckets is None:
        if any(s.pixel_values is not None for g in groups for s in g):
            raise ValueError("a sample has an image but BatchSpec.patch_buckets is None; expected patch buckets")
        return seq, None
    total = max((sum(s.num_patches for s in g) for g in groups), default=0)
    return seq, choose_bucket(max(total, 1), spec.patch_buckets, "patches per batch")


def collate(rows: Sequence[Sample | None], spec: BatchSpec, prepare_fn: Callable, *, seq_bucket: int | None = None,
            patch_bucket: int | None = None) -> tuple[ModelInputs, dict]:
    """Pad ``rows`` (``None`` = dummy row) into the model inputs of ``len(rows)`` rows.

    Returns ``(inputs, stats)``: ``inputs`` from ``prepare_fn`` (input_ids [R, L] int32,
    attention_mask [R, L] int32, position_ids [3, R, L], and the vision arrays when
    ``spec.patch_buckets`` is set), ``stats`` = seq_bucket, patch_bucket, token_waste,
    patch_waste (fractions in [0, 1]).
    """
    real = [r for r in rows if r is not None]
    if seq_bucket is None or (patch_bucket is None and spec.patch_buckets is not None):
        seq_b, patch_b = _buckets_for([real], spec)
        seq_bucket = seq_bucket or seq_b
        patch_bucket = patch_bucket or patch_b
    num_rows = len(rows)
    input_ids = np.full((num_rows, seq_bucket), spec.pad_id, dtype=np.int32)  # [R, L]
    attention = np.zeros((num_rows, seq_bucket), dtype=np.int32)  # [R, L]
    pixels, grids = [], []
    real_tokens = 0
    for i, row in enumerate(rows):
        ids = np.asarray(row.input_ids, dtype=np.int32) if row is not None else np.asarray([spec.pad_id], np.int32)
        n = len(ids)
        if n > seq_bucket:
            raise ValueError(f"row {i}: length {n} exceeds the sequence bucket {seq_bucket}")
        sl = slice(0, n) if spec.padding_side == "right" else slice(seq_bucket - n, seq_bucket)
        input_ids[i, sl] = ids
        attention[i, sl] = 1
        if row is not None:
            real_tokens += n
            if row.pixel_values is not None:
                pixels.append(np.asarray(row.pixel_values, dtype=np.float32))  # [P_i, D]
                grids.append(np.asarray(row.image_grid_thw, dtype=np.int64).reshape(1, 3))
    real_patches = sum(p.shape[0] for p in pixels)
    if spec.patch_buckets is None:
        pixel_values = image_grid_thw = None
    else:
        if real_patches > patch_bucket:
            raise ValueError(f"{real_patches} patches exceed the patch bucket {patch_bucket}")
        dim = pixels[0].shape[1] if pixels else spec.patch_dim
        if dim is None:
            raise ValueError("a batch with image slots holds no image; expected BatchSpec.patch_dim to size it")
        pixel_values = np.concatenate(pixels, 0) if pixels else np.zeros((0, dim), np.float32)  # [sum P_i, D]
        image_grid_thw = np.concatenate(grids, 0) if grids else np.zeros((0, 3), np.int64)  # [images, 3]
    inputs = prepare_fn(input_ids, attention, pixel_values, image_grid_thw, num_patches=patch_bucket)
    if not isinstance(inputs, ModelInputs):
        raise TypeError(f"collate: prepare_fn returned {type(inputs).__name__}; expected ModelInputs "
                        "(as qwen2_vl.prepare_batch returns)")
    stats = {
        "seq_bucket": int(seq_bucket),
        "patch_bucket": None if patch_bucket is None else int(patch_bucket),
        "token_waste": 1.0 - real_tokens / float(num_rows * seq_bucket),
        "patch_waste": 0.0 if not patch_bucket else 1.0 - real_patches / float(patch_bucket),
    }
    return inputs, stats


def collate_train(samples: Sequence[Sample], labels: Sequence[float], domain_ids: Sequence[int], spec: BatchSpec,
                  prepare_fn: Callable, *, seq_bucket: int | None = None, patch_bucket: int | None = None,
                  record_ids: Sequence[int] | None = None) -> tuple[TrainBatch, dict]:
    """Training batch of ``spec.batch_size`` rows (dummy rows fill a short batch).

    The model inputs with ``labels`` [B] f32, ``domain_ids`` [B] i32, ``sample_mask`` [B]
    f32 (1 real, 0 dummy) and ``record_ids`` [B] i32 (``record_ids[i]`` for sample i, 0 for
    dummy rows; ``None``: the batch carries none).
    """
    n, size = len(samples), spec.batch_size
    if n > size or len(labels) != n or len(domain_ids) != n or (record_ids is not None and len(record_ids) != n):
        raise ValueError(f"collate_train: expected at most {size} samples with one label, domain (and record id) "
                         f"each; got {n} samples, {len(labels)} labels, {len(domain_ids)} domain ids"
                         + ("" if record_ids is None else f", {len(record_ids)} record ids"))
    rows = list(samples) + [None] * (size - n)
    inputs, stats = collate(rows, spec, prepare_fn, seq_bucket=seq_bucket, patch_bucket=patch_bucket)
    lab = np.zeros((size,), np.float32)
    lab[:n] = np.asarray(labels, np.float32)
    dom = np.zeros((size,), np.int32)
    dom[:n] = np.asarray(domain_ids, np.int32)
    mask = np.zeros((size,), np.float32)
    mask[:n] = 1.0
    rec = None
    if record_ids is not None:
        rec = np.zeros((size,), np.int32)  # [B]; dummy rows point at record 0, masked
        rec[:n] = np.asarray(record_ids, np.int32)
    return TrainBatch(inputs, labels=lab, domain_ids=dom, sample_mask=mask, record_ids=rec), stats


def _meta_rows(chains: Sequence[Sequence[Sample]], spec: BatchSpec, num_steps: int):
    M = spec.batch_size
    if len(chains) > M:
        raise ValueError(f"collate_meta: expected at most {M} chains, got {len(chains)}")
    rows: list[Sample | None] = []
    step_mask = np.zeros((M, num_steps), np.float32)  # [M, S]
    for m in range(M):
        chain = chains[m] if m < len(chains) else []
        if len(chain) > num_steps:
            raise ValueError(f"collate_meta: chain {m} has {len(chain)} steps, more than S = {num_steps}")
        rows.extend(chain)
        rows.extend([None] * (num_steps - len(chain)))
        step_mask[m, : len(chain)] = 1.0
    return rows, step_mask


def _num_steps(chain_groups, spec: BatchSpec) -> int:
    longest = max((len(c) for g in chain_groups for c in g), default=1)
    if spec.max_steps is not None:
        if longest > spec.max_steps:
            raise ValueError(f"a chain has {longest} steps, more than BatchSpec.max_steps = {spec.max_steps}")
        return spec.max_steps
    return choose_bucket(longest, spec.step_buckets, "steps per chain")


def pack_chain(chain: Sequence[Sample], where: str = "chain") -> tuple[Sample, np.ndarray, np.ndarray]:
    """One packed row for a chain's step-prefix samples (see the module docstring).

    Args:
      chain: the S prefix samples of steps 1..S (same image); the last one is the trunk.
      where: names the chain in errors.

    Returns:
      ``(sample, branch [L'] int32, score_pos [S] int32)``: the packed tokens (the chain's
      image once), 0 for trunk tokens and ``k + 1`` for the tail of prefix ``k``, and the
      position of each prefix's last token in the packed row.

    Raises ValueError when the prefixes carry different images or share no beginning. The
    shared part must also cover the image tokens (a tail holding image tokens would make
    ``prepare_batch`` reject the row for its image-token count); DreamPRM's prefixes differ
    only in the text after the question, well past the image.
    """
    full = np.asarray(chain[-1].input_ids, np.int32)
    for sample in chain:
        if (sample.pixel_values is None) != (chain[-1].pixel_values is None) or (
                sample.pixel_values is not None and (sample.pixel_values.shape != chain[-1].pixel_values.shape
                                                     or not np.array_equal(sample.image_grid_thw, chain[-1].image_grid_thw))):
            raise ValueError(f"pack_chain: {where}: its step prefixes carry different images; expected one image per chain")
    tails = []  # (insertion point c, k, tail tokens)
    for k, sample in enumerate(chain[:-1]):
        ids = np.asarray(sample.input_ids, np.int32)
        n = min(len(ids), len(full))
        diff = np.nonzero(ids[:n] != full[:n])[0]
        c = int(diff[0]) if diff.size else n
        if c == 0:
            raise ValueError(f"pack_chain: {where}: step {k + 1}'s prefix shares no beginning with the last step's; "
                             "expected prefixes of one chain")
        tails.append((c, k, ids[c:]))
    ids_out: list[np.ndarray] = []
    branch_out: list[np.ndarray] = []
    score_pos = np.zeros((len(chain),), np.int32)
    length = t = 0
    trunk_last = -1  # packed position of the trunk token full[t - 1]
    for c, k, tail in sorted(tails, key=lambda x: (x[0], x[1])):
        if c > t:
            ids_out.append(full[t:c])
            branch_out.append(np.zeros((c - t,), np.int32))
            length += c - t
            t, trunk_last = c, length - 1
        if len(tail) == 0:  # prefix k is a prefix of the trunk: read it there
            score_pos[k] = trunk_last
            continue
        ids_out.append(tail)
        branch_out.append(np.full((len(tail),), k + 1, np.int32))
        length += len(tail)
        score_pos[k] = length - 1
    ids_out.append(full[t:])
    branch_out.append(np.zeros((len(full) - t,), np.int32))
    length += len(full) - t
    score_pos[-1] = length - 1
    packed = Sample(np.concatenate(ids_out), chain[-1].pixel_values, chain[-1].image_grid_thw)
    return packed, np.concatenate(branch_out), score_pos


def _own_prefix_positions(position_ids: np.ndarray, branch: np.ndarray) -> np.ndarray:
    """Position ids ``[3, L]`` of a packed row, moved to each token's position in its own prefix.

    Computed on the packed order, a token sits after the tails of other prefixes inserted
    before it; it must not count them: ``pos[i] -= #{j < i : branch[j] not in (0, branch[i])}``.
    Those tokens are text after the image, where M-RoPE's three components advance together.
    """
    other = branch != 0  # [L]
    before = np.cumsum(other) - other  # [L] branch tokens before i
    own = np.zeros_like(before)
    for b in np.unique(branch[other]):
        sel = branch == b
        own[sel] = (np.cumsum(sel) - sel)[sel]
    return position_ids - (before - own)[None, :].astype(position_ids.dtype)


def _collate_packed_meta(chains: Sequence[Sequence[Sample]], spec: BatchSpec, prepare_fn: Callable, S: int, *,
                         seq_bucket: int | None, patch_bucket: int | None):
    """One packed row per chain (chains already checked by ``_meta_rows``)."""
    M = spec.batch_size
    rows: list[Sample | None] = []
    branches, positions = [], []
    for m in range(M):
        chain = chains[m] if m < len(chains) else []
        if not chain:
            rows.append(None)
            branches.append(np.zeros((1,), np.int32))
            positions.append(np.zeros((S,), np.int32))
            continue
        packed, branch, pos = pack_chain(chain, f"chain {m}")
        rows.append(packed)
        branches.append(branch)
        positions.append(np.concatenate([pos, np.full((S - len(pos),), pos[-1], np.int32)]))
    inputs, stats = collate(rows, spec, prepare_fn, seq_bucket=seq_bucket, patch_bucket=patch_bucket)
    L = inputs.input_ids.shape[1]
    branch_ids = np.zeros((M, L), np.int32)  # [M, L]
    score_index = np.zeros((M, S), np.int32)  # [M, S]
    position_ids = np.array(inputs.position_ids)  # [3, M, L]
    for m, (branch, pos) in enumerate(zip(branches, positions)):
        offset = 0 if spec.padding_side == "right" else L - len(branch)
        branch_ids[m, offset: offset + len(branch)] = branch
        score_index[m] = pos + offset
        real = inputs.attention_mask[m] > 0  # [L] (padding keeps its position)
        position_ids[:, m, real] = _own_prefix_positions(position_ids[:, m, real], branch_ids[m, real])
    return dataclasses.replace(inputs, position_ids=position_ids, branch_ids=branch_ids, score_index=score_index), stats


def collate_meta(chains: Sequence[Sequence[Sample]], labels: Sequence[float], spec: BatchSpec, prepare_fn: Callable,
                 *, num_steps: int | None = None, seq_bucket: int | None = None, patch_bucket: int | None = None,
                 question_ids: Sequence[int] | None = None) -> tuple[MetaBatch, dict]:
    """Meta batch: M = ``spec.batch_size`` chains x S steps, rows flattened chain-major.

    ``chains[m][s]`` is the prefix sample of step s + 1 of chain m.  The model inputs with
    ``step_mask`` [M, S] f32 (1 for a real step), ``labels`` [M] f32, ``chain_mask`` [M] f32
    and ``question_index`` [M] i32: ``question_ids[m]`` (``None``: every chain its own
    question, ``m``), -1 for dummy chains.
    """
    if len(labels) != len(chains):
        raise ValueError(f"collate_meta: expected one label per chain; got {len(chains)} chains, {len(labels)} labels")
    if question_ids is not None and len(question_ids) != len(chains):
        raise ValueError(f"collate_meta: expected one question id per chain; got {len(chains)} chains, "
                         f"{len(question_ids)} question ids")
    S = num_steps if num_steps is not None else _num_steps([chains], spec)
    rows, step_mask = _meta_rows(chains, spec, S)  # also checks the chain count and lengths
    if spec.pack_chains:
        inputs, stats = _collate_packed_meta(chains, spec, prepare_fn, S, seq_bucket=seq_bucket, patch_bucket=patch_bucket)
    else:
        inputs, stats = collate(rows, spec, prepare_fn, seq_bucket=seq_bucket, patch_bucket=patch_bucket)
    M = spec.batch_size
    lab = np.zeros((M,), np.float32)
    lab[: len(chains)] = np.asarray(labels, np.float32)
    chain_mask = np.zeros((M,), np.float32)
    chain_mask[: len(chains)] = 1.0
    question_index = np.full((M,), -1, np.int32)  # [M]
    question_index[: len(chains)] = np.arange(len(chains)) if question_ids is None else np.asarray(question_ids)
    stats["num_steps"] = S
    return MetaBatch(inputs, step_mask=step_mask, labels=lab, chain_mask=chain_mask,
                     question_index=question_index), stats


def stack(batches: Sequence[Any]) -> Any:
    """``T`` batches of one structure -> that structure with ``[T, ...]`` arrays."""
    structure = jax.tree.structure(batches[0])
    for t, b in enumerate(batches[1:], 1):
        if jax.tree.structure(b) != structure:
            raise ValueError(f"stack: batch {t} has the structure {jax.tree.structure(b)}, expected that of batch 0, "
                             f"{structure} (every batch of a stack must carry the same fields)")
    return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs], axis=0), *batches)  # [T, ...]


def _merge_stats(stats: Sequence[dict]) -> dict:
    out = dict(stats[0])
    out["token_waste"] = float(np.mean([s["token_waste"] for s in stats]))
    out["patch_waste"] = float(np.mean([s["patch_waste"] for s in stats]))
    return out


def stack_train(groups: Sequence[tuple[Sequence[Sample], Sequence[float], Sequence[int]]], spec: BatchSpec,
                prepare_fn: Callable):
    """T training batches ``[(samples, labels, domain_ids)] * T`` (or ``(samples, labels,
    domain_ids, record_ids)``) -> one :class:`TrainBatch` of [T, ...] arrays.

    All T share the (L, N) buckets of the largest; stats' wastes are the mean over T.
    """
    seq_b, patch_b = _buckets_for([g[0] for g in groups], spec)
    out = [collate_train(g[0], g[1], g[2], spec, prepare_fn, seq_bucket=seq_b, patch_bucket=patch_b,
                         record_ids=g[3] if len(g) > 3 else None) for g in groups]
    return stack([b for b, _ in out]), _merge_stats([s for _, s in out])


def stack_meta(groups: Sequence[tuple[Sequence[Sequence[Sample]], Sequence[float]]], spec: BatchSpec,
               prepare_fn: Callable):
    """T meta batches ``[(chains, labels)] * T`` (or ``(chains, labels, question_ids)``) -> [T, ...]
    arrays with one (S, L, N) bucket."""
    S = _num_steps([g[0] for g in groups], spec)
    if spec.pack_chains:  # buckets of the packed rows (longer than any one prefix, one image per chain)
        rows = [[pack_chain(c, f"chain {m}")[0] for m, c in enumerate(g[0]) if c] for g in groups]
    else:
        rows = [[s for c in g[0] for s in c] for g in groups]
    seq_b, patch_b = _buckets_for(rows, spec)
    out = [collate_meta(g[0], g[1], spec, prepare_fn, num_steps=S, seq_bucket=seq_b, patch_bucket=patch_b,
                        question_ids=g[2] if len(g) > 2 else None) for g in groups]
    return stack([b for b, _ in out]), _merge_stats([s for _, s in out])


# ----------------------------------------------------------------------------- sampler


class Sampler:
    """Seeded, resumable index sampler over ``num_items`` items, endless over epochs.

    Epoch e visits the permutation ``order(e)``, drawn from ``np.random.default_rng([seed,
    e])`` (so any epoch can be recomputed from plain ints); ``next()`` returns the next
    ``batch_size`` indices, continuing into epoch e + 1 when epoch e runs out (every item
    once per epoch; no sample dropped).  The whole state is ``(epoch, position, seed)``:
    ``state_dict()`` / ``load_state_dict()`` give the same continuation after a restart.

    Modes (``groups`` = per-item domain ids, needed by the last two):

    * ``"shuffle"``: a uniform permutation (``"sequential"``: no shuffling);
    * ``"stratified"``: each domain shuffled, then interleaved so every window of the order
      holds domains in proportion to their sizes (item j of domain g of size n_g gets sort
      key (j + u_g) / n_g, u_g ~ U[0, 1) per epoch);
    * ``"balanced"``: every domain contributes n_max = (largest domain size) items per epoch
      (smaller domains repeat fresh permutations), interleaved round-robin in a random
      domain order, so each batch holds domains in equal shares.
    """

    MODES = ("shuffle", "sequential", "stratified", "balanced")

    def __init__(self, num_items: int, batch_size: int, seed: int = 0, mode: str = "shuffle",
                 groups: Sequence[int] | None = None):
        if num_items <= 0 or batch_size <= 0:
            raise ValueError(f"Sampler: expected num_items > 0 and batch_size > 0, got {num_items}, {batch_size}")
        if mode not in self.MODES:
            raise ValueError(f"Sampler.mode: expected one of {self.MODES}, got {mode!r}")
        if mode in ("stratified", "balanced"):
            if groups is None or len(groups) != num_items:
                raise ValueError(f"Sampler mode {mode!r}: expected groups with one domain id per item ({num_items})")
        self.num_items, self.batch_size, self.mode = int(num_items), int(batch_size), mode
        self.groups = None if groups is None else np.asarray(groups, np.int64)
        self.seed, self.epoch, self.position = int(seed), 0, 0
        self._cache: tuple[int, np.ndarray] | None = None

    def order(self, epoch: int) -> np.ndarray:
        """Item order of ``epoch`` (int64 [epoch length])."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        rng = np.random.default_rng([self.seed, epoch])
        n = self.num_items
        if self.mode == "sequential":
            order = np.arange(n)
        elif self.mode == "shuffle":
            order = rng.permutation(n)
        else:
            domains = np.unique(self.groups)
            members = [rng.permutation(np.flatnonzero(self.groups == g)) for g in domains]
            if self.mode == "stratified":
                keys = np.concatenate([(np.arange(len(m)) + rng.random()) / len(m) for m in members])
                items = np.concatenate(members)
            else:
                n_max = max(len(m) for m in members)
                rank = rng.permutation(len(members))  # domain order within each round
                items, keys = [], []
                for g, m in enumerate(members):
                    reps = [m] + [rng.permutation(m) for _ in range(-(-n_max // len(m)) - 1)]
                    items.append(np.concatenate(reps)[:n_max])
                    keys.append(np.arange(n_max) + rank[g] / len(members))
                items, keys = np.concatenate(items), np.concatenate(keys)
            order = items[np.argsort(keys, kind="stable")]
        self._cache = (epoch, order)
        return order

    def next(self) -> np.ndarray:
        """The next ``batch_size`` item indices (int64)."""
        out = []
        need = self.batch_size
        while need:
            order = self.order(self.epoch)
            take = order[self.position: self.position + need]
            out.append(take)
            need -= len(take)
            self.position += len(take)
            if self.position >= len(order):
                self.epoch, self.position = self.epoch + 1, 0
        return np.concatenate(out)

    def __iter__(self):
        while True:
            yield self.next()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position, self.seed = int(state["epoch"]), int(state["position"]), int(state["seed"])
        self._cache = None


class QuestionSampler:
    """Seeded, resumable sampler of whole questions: every chain of a drawn question, together.

    The ranking meta losses compare the candidates of one question, so a meta batch must hold
    all of them. ``next()`` draws ``Q = batch_size // C`` questions (C = the most chains of
    any question) from a :class:`Sampler` over questions (shuffled, endless over epochs) and
    returns their chain indices, question after question: at most ``batch_size`` chains.

    Args:
      chain_questions: ``[num_chains]`` int, the question of each chain.
      batch_size: chains per meta batch (``--meta-batch-size``).
      seed: seed of the question order.
    """

    def __init__(self, chain_questions: Sequence[int], batch_size: int, seed: int = 0):
        chain_questions = np.asarray(chain_questions, np.int64)  # [num_chains]
        if chain_questions.ndim != 1 or chain_questions.size == 0:
            raise ValueError(f"QuestionSampler: expected a non-empty [num_chains] question index, "
                             f"got shape {chain_questions.shape}")
        _, first, inverse = np.unique(chain_questions, return_index=True, return_inverse=True)
        rank = np.argsort(np.argsort(first))  # questions numbered in order of first appearance
        order = np.argsort(rank[inverse], kind="stable")
        counts = np.bincount(rank[inverse])
        self.members = np.split(order, np.cumsum(counts)[:-1])  # chains of question q, in file order
        most = int(counts.max())
        if most > batch_size:
            raise ValueError(f"QuestionSampler: a question has {most} chains, more than the {batch_size} chains of "
                             "a meta batch; expected --meta-batch-size >= the most candidates of any meta question")
        self.questions_per_batch = batch_size // most
        self._questions = Sampler(len(self.members), self.questions_per_batch, seed=seed)

    @property
    def num_questions(self) -> int:
        return len(self.members)

    @property
    def seed(self) -> int:
        return self._questions.seed

    def next(self) -> np.ndarray:
        """Chain indices (int64) of the next ``questions_per_batch`` questions."""
        return np.concatenate([self.members[int(q)] for q in self._questions.next()])

    def __iter__(self):
        while True:
            yield self.next()

    def state_dict(self) -> dict:
        return self._questions.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self._questions.load_state_dict(state)


# ----------------------------------------------------------------------------- from prepared tables


class BatchBuilder:
    """Reads rows of a :class:`~dreamprm_jax.data.dataset.PreparedData` and collates them.

    ``train_batch(indices)`` / ``stacked_train(list_of_indices)`` for training tables,
    ``meta_batch(chain_indices)`` / ``stacked_meta(list_of_chain_indices)`` for meta tables
    (each chain's ``question_index`` from the table).
    Image patches are read once per distinct image per call.
    """

    def __init__(self, data: Any, spec: BatchSpec, prepare_fn: Callable):
        self.data, self.spec, self.prepare_fn = data, spec, prepare_fn
        self.samples = data.samples.with_format("numpy")
        self.images = data.images.with_format("numpy")
        self.patch_dim = data.info.get("patch_dim")
        if spec.patch_dim is None and self.patch_dim is not None:
            self.spec = dataclasses.replace(spec, patch_dim=int(self.patch_dim))
        self._chains = data.chain_rows() if data.info["kind"] == "meta" else None
        self._questions = data.chain_questions() if data.info["kind"] == "meta" else None

    @property
    def num_chains(self) -> int:
        return len(self._chains)

    def _rows(self, indices: Sequence[int]) -> tuple[list[Sample], dict]:
        idx = [int(i) for i in indices]
        cols = self.samples[idx]
        images: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        out = []
        for j in range(len(idx)):
            ids = np.asarray(cols["input_ids"][j], np.int32)
            im = int(cols["image_index"][j])
            if im < 0:
                out.append(Sample(ids))
                continue
            if im not in images:
                row = self.images[im]
                grid = np.asarray(row["image_grid_thw"], np.int64)
                images[im] = (np.asarray(row["pixel_values"], np.float32).reshape(int(row["num_patches"]), -1), grid)
            out.append(Sample(ids, *images[im]))
        return out, cols

    def _train_group(self, indices):
        rows, cols = self._rows(indices)
        # A training table holds one row per record: the row index is the record's index.
        return (rows, np.asarray(cols["label"], np.float32), np.asarray(cols["domain_id"], np.int32),
                np.asarray([int(i) for i in indices], np.int32))

    def train_batch(self, indices: Sequence[int]):
        rows, labels, domain_ids, record_ids = self._train_group(indices)
        return collate_train(rows, labels, domain_ids, self.spec, self.prepare_fn, record_ids=record_ids)

    def stacked_train(self, index_lists: Sequence[Sequence[int]]):
        return stack_train([self._train_group(i) for i in index_lists], self.spec, self.prepare_fn)

    def _meta_group(self, chain_indices):
        chains, labels = [], []
        for c in chain_indices:
            start, count = self._chains[int(c)]
            rows, cols = self._rows(range(start, start + count))
            chains.append(rows)
            labels.append(float(cols["label"][0]))
        return chains, labels, [int(self._questions[int(c)]) for c in chain_indices]

    def meta_batch(self, chain_indices: Sequence[int]):
        chains, labels, questions = self._meta_group(chain_indices)
        return collate_meta(chains, labels, self.spec, self.prepare_fn, question_ids=questions)

    def stacked_meta(self, chain_lists: Sequence[Sequence[int]]):
        return stack_meta([self._meta_group(c) for c in chain_lists], self.spec, self.prepare_fn)
