"""A trained PRM as the evaluation library's scoring callable, batched over static buckets.

The evaluation package only ever sees ``score_fn(requests) -> logits [R]`` (see
:mod:`dreamprm_jax.evaluation.scoring`). :class:`PRMScorer` is that callable for a
Qwen2-VL PRM::

    scorer = load_scorer("runs/default/export")             # prm.load + Processor
    step_scores = evaluation.score_steps(questions, scorer)  # every step prefix, once
    print(scorer.stats.chains_per_s, scorer.compile_count)

What one call does, for R requests:

1. *Encode* (host). Each request's text goes through the Qwen2-VL chat template with its
   image (``Processor.encode``); an image is decoded and patchified once per distinct
   file and reused by every prefix of every candidate that shows it.
2. *Bucket* (host). Requests are ordered by (patch count, token count), so neighbours
   have similar lengths, and cut into batches of ``batch_size`` rows (the last one filled
   with dummy rows). Each batch is padded by ``data.batching.collate`` to the smallest
   sequence bucket L >= its longest row and the smallest patch bucket N >= its total
   patches — the training loop's static buckets, so ``jit`` compiles once per (L, N)
   pair that occurs, never per batch, and the compiled programs are shared by every
   scorer of the same model config (vanilla and DreamPRM checkpoints alike).
3. *Score* (device). One jitted ``prm.score`` per batch returns the reward logits
   ``z [B]`` (pre-sigmoid log-odds). Batch k + 1 is prepared and dispatched before the
   logits of batch k are fetched, so the host encodes while the device computes.
4. *Return* the logits of the real rows, scattered back into request order, as
   float64 ``[R]``.

Every row of a batch is scored independently (its own attention mask and its own image
segment), so a request's logit does not depend on its batch neighbours beyond float
rounding in the matrix kernels (tests check 1e-5 against a direct single-row
``prm.score``).

Throughput (:class:`ScorerStats`): ``prefixes_per_s`` = requests / wall seconds,
``chains_per_s`` = distinct candidate ids / wall seconds, over everything this scorer
has scored since construction (or :meth:`PRMScorer.reset_stats`); wall time includes
encoding and compilation. ``steady_chains_per_s`` leaves out the time of the calls that
traced and compiled a new program (jit compiles synchronously, before dispatch).
``compile_count`` is the number of times the shared scoring function was traced: jit
traces once per new (B, L, N) shape, and each trace is one compiled program.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from dreamprm_jax.data.batching import BatchSpec, Sample, choose_bucket, collate, model_prepare_fn
from dreamprm_jax.data.processor import Processor, render_chat
from dreamprm_jax.evaluation.scoring import StepRequest
from dreamprm_jax.models import prm

__all__ = [
    "DEFAULT_PATCH_BUCKETS",
    "DEFAULT_SEQ_BUCKETS",
    "TRAINING_PROCESSOR_DEFAULTS",
    "ExportNotFoundError",
    "PRMScorer",
    "ScorerStats",
    "ScoringFunction",
    "load_scorer",
    "scoring_function",
]


def _train_defaults() -> Any:
    from dreamprm_jax.configs import TrainConfig

    return TrainConfig()


#: The training loop's static buckets (TrainConfig defaults), so shapes match training's.
DEFAULT_SEQ_BUCKETS: tuple[int, ...] = tuple(_train_defaults().seq_buckets)
DEFAULT_PATCH_BUCKETS: tuple[int, ...] = tuple(_train_defaults().patch_buckets)
#: Image settings the training loop gives its processor by default. An export made with
#: the offline demo tokenizer carries no preprocessor_config.json, so these are the
#: settings its training data was encoded with.
TRAINING_PROCESSOR_DEFAULTS: dict[str, int] = {
    "max_image_side": _train_defaults().max_image_side,
    "min_pixels": _train_defaults().min_pixels,
    "max_pixels": _train_defaults().max_pixels,
}


class ExportNotFoundError(FileNotFoundError):
    """An exported PRM directory is missing or incomplete; the message names it."""


class ScoringFunction:
    """The jitted ``(params, batch) -> logits [B]`` of one model config, and ``trace_count``:
    how many times jit traced it. The counter is bumped inside the traced Python function,
    which jit runs once per new input signature (a cache miss: one more compiled program)."""

    def __init__(self, config):
        self.trace_count = 0

        def logits(params, batch):
            self.trace_count += 1  # runs while tracing only, never in the compiled program
            _, z = prm.score(config, params, batch)  # [B] f32
            return z

        self._jitted = jax.jit(logits)

    def __call__(self, params, batch) -> jax.Array:
        return self._jitted(params, batch)


@functools.lru_cache(maxsize=None)
def scoring_function(config) -> ScoringFunction:
    """The :class:`ScoringFunction` of one (hashable) model config. Cached per config, so all
    scorers of one architecture share compiled programs (and one ``trace_count``)."""
    return ScoringFunction(config)


@dataclasses.dataclass
class ScorerStats:
    """Cumulative work and wall time of a scorer (module docstring for the definitions)."""

    num_requests: int = 0
    num_chains: int = 0
    num_batches: int = 0
    seconds: float = 0.0
    encode_seconds: float = 0.0
    real_tokens: int = 0
    padded_tokens: int = 0
    buckets: dict[str, int] = dataclasses.field(default_factory=dict)   # "L=..,N=.." -> batches
    compiles: int = 0                                                   # new programs compiled
    compile_seconds: float = 0.0                                        # dispatch calls that compiled

    @property
    def prefixes_per_s(self) -> float:
        return self.num_requests / self.seconds if self.seconds > 0 else float("nan")

    @property
    def chains_per_s(self) -> float:
        return self.num_chains / self.seconds if self.seconds > 0 else float("nan")

    @property
    def steady_chains_per_s(self) -> float:
        """Chains per second without the calls that traced and compiled a new program."""
        rest = self.seconds - self.compile_seconds
        return self.num_chains / rest if rest > 0 else float("nan")

    @property
    def token_waste(self) -> float:
        return 1.0 - self.real_tokens / self.padded_tokens if self.padded_tokens else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"num_requests": self.num_requests, "num_chains": self.num_chains,
                "num_batches": self.num_batches, "seconds": self.seconds,
                "encode_seconds": self.encode_seconds, "prefixes_per_s": self.prefixes_per_s,
                "chains_per_s": self.chains_per_s, "steady_chains_per_s": self.steady_chains_per_s,
                "compile_seconds": self.compile_seconds, "token_waste": self.token_waste,
                "buckets": dict(sorted(self.buckets.items())), "compiles": self.compiles}


class PRMScorer:
    """``scorer(requests) -> logits [R]`` for a Qwen2-VL PRM (module docstring).

    Args:
      config: the backbone's ``Qwen2VLConfig``.
      params: PRM parameters (``{"backbone", "head"}``); moved to the device once.
      processor: the :class:`~dreamprm_jax.data.processor.Processor` the PRM was trained with.
      batch_size: rows per forward pass (B; every batch has exactly B rows).
      seq_buckets, patch_buckets: static sequence-length / patches-per-batch buckets
        (default: the training loop's).
      progress: show a tqdm bar (requests) while scoring.
      desc: the bar's label.
    """

    def __init__(self, config, params, processor: Processor, *, batch_size: int = 16,
                 seq_buckets: Sequence[int] = DEFAULT_SEQ_BUCKETS,
                 patch_buckets: Sequence[int] = DEFAULT_PATCH_BUCKETS,
                 progress: bool = False, desc: str = "scoring"):
        if batch_size < 1:
            raise ValueError(f"PRMScorer: batch_size must be >= 1, got {batch_size}")
        self.config = config
        self.params = jax.device_put(params)
        self.processor = processor
        self.spec = BatchSpec(batch_size=int(batch_size), seq_buckets=tuple(int(b) for b in seq_buckets),
                              patch_buckets=tuple(int(b) for b in patch_buckets),
                              pad_id=processor.special_token_ids.pad, patch_dim=processor.patch_dim)
        self.progress = progress
        self.desc = desc
        self._prepare = model_prepare_fn(config)
        self._fn = scoring_function(config)
        self._images: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.stats = ScorerStats()

    # ------------------------------------------------------------------ bookkeeping
    @property
    def compile_count(self) -> int:
        """Programs compiled for this model config so far, by every scorer of it (one per batch shape)."""
        return self._fn.trace_count

    def reset_stats(self) -> None:
        self.stats = ScorerStats()

    # ------------------------------------------------------------------ encoding
    def _image(self, path: str) -> tuple[np.ndarray, np.ndarray]:
        """(pixel_values [P, D], image_grid_thw [1, 3]) of one file, computed once."""
        if path not in self._images:
            self._images[path] = self.processor.preprocess_image(path)
        return self._images[path]

    def encode(self, requests: Sequence[StepRequest]) -> list[Sample]:
        """One :class:`~dreamprm_jax.data.batching.Sample` per request (= ``Processor.encode``)."""
        rendered, images = [], []
        for r in requests:
            if r.image_path is None:
                rendered.append(render_chat(r.text))
                images.append(None)
            else:
                pixels, grid = self._image(r.image_path)
                rendered.append(render_chat(r.text, self.processor.num_image_tokens(grid)))
                images.append((pixels, grid))
        ids = self.processor.tokenizer(rendered, add_special_tokens=False)["input_ids"] if rendered else []
        out = []
        for tokens, image in zip(ids, images):
            tokens = np.asarray(tokens, dtype=np.int32)  # [L_r]
            out.append(Sample(tokens) if image is None else Sample(tokens, image[0], image[1]))
        return out

    def _check_fits(self, samples: Sequence[Sample], requests: Sequence[StepRequest]) -> None:
        """Fail before any compute when a single row cannot fit the largest buckets."""
        longest = max(range(len(samples)), key=lambda i: len(samples[i].input_ids))
        most_patches = max(range(len(samples)), key=lambda i: samples[i].num_patches)
        for i, what, size, buckets in (
                (longest, "sequence length", len(samples[longest].input_ids), self.spec.seq_buckets),
                (most_patches, "image patches", samples[most_patches].num_patches, self.spec.patch_buckets)):
            try:
                choose_bucket(max(size, 1), buckets, what)
            except ValueError as e:
                r = requests[i]
                raise ValueError(f"candidate {r.candidate_id}, step {r.step_index + 1} "
                                 f"(image {r.image_path}): {e}") from None

    def _batches(self, samples: Sequence[Sample]) -> list[list[int]]:
        """Request indices per batch: ordered by (patches, length); B rows (or fewer) each.

        A batch is cut early when adding a row would exceed the largest patch bucket.
        """
        order = sorted(range(len(samples)), key=lambda i: (samples[i].num_patches, len(samples[i].input_ids), i))
        max_patches = max(self.spec.patch_buckets)
        batches, current, patches = [], [], 0
        for i in order:
            p = samples[i].num_patches
            if current and (len(current) == self.spec.batch_size or patches + p > max_patches):
                batches.append(current)
                current, patches = [], 0
            current.append(i)
            patches += p
        if current:
            batches.append(current)
        return batches

    # ------------------------------------------------------------------ scoring
    def __call__(self, requests: Sequence[StepRequest]) -> np.ndarray:
        """Reward logits (pre-sigmoid) of ``requests``, in request order, float64 [R]."""
        requests = list(requests)
        out = np.zeros((len(requests),), dtype=np.float64)  # [R]
        if not requests:
            return out
        t0 = time.perf_counter()
        compiled_before = self.compile_count
        samples = self.encode(requests)
        self._check_fits(samples, requests)
        self.stats.encode_seconds += time.perf_counter() - t0
        batches = self._batches(samples)
        B = self.spec.batch_size

        from tqdm.auto import tqdm

        bar = tqdm(total=len(requests), desc=self.desc, disable=not self.progress, unit="seq",
                   dynamic_ncols=True, leave=False)
        pending: tuple[list[int], Any] | None = None

        def fetch(rows: list[int], z) -> None:
            out[rows] = np.asarray(jax.device_get(z), dtype=np.float64)[: len(rows)]  # [b]
            bar.update(len(rows))

        try:
            for rows in batches:
                batch, info = collate([samples[i] for i in rows] + [None] * (B - len(rows)), self.spec,
                                      self._prepare)
                programs, t_call = self.compile_count, time.perf_counter()
                z = self._fn(self.params, batch)  # [B] on device, asynchronous
                if self.compile_count > programs:  # tracing + compilation run synchronously here
                    self.stats.compile_seconds += time.perf_counter() - t_call
                if pending is not None:
                    fetch(*pending)
                pending = (rows, z)
                key = f"L={info['seq_bucket']},N={info['patch_bucket']}"
                self.stats.buckets[key] = self.stats.buckets.get(key, 0) + 1
                self.stats.real_tokens += sum(len(samples[i].input_ids) for i in rows)
                self.stats.padded_tokens += B * int(info["seq_bucket"])
            if pending is not None:
                fetch(*pending)
        finally:
            bar.close()
        self.stats.num_requests += len(requests)
        self.stats.num_chains += len({r.candidate_id for r in requests})
        self.stats.num_batches += len(batches)
        self.stats.seconds += time.perf_counter() - t0
        self.stats.compiles += self.compile_count - compiled_before
        return out


# ---------------------------------------------------------------------------------------
# Loading an exported PRM
# ---------------------------------------------------------------------------------------


def _check_export(export_dir: str) -> None:
    if not os.path.isdir(export_dir):
        raise ExportNotFoundError(
            f"{export_dir}: no exported PRM here (the directory does not exist); expected a directory "
            f"written by prm.save / the training export (<run>/export, e.g. `python -m experiments.train "
            f"--out-dir {os.path.dirname(os.path.normpath(export_dir)) or '.'}`)")
    missing = [f for f in ("config.json", prm.HEAD_FILE) if not os.path.isfile(os.path.join(export_dir, f))]
    if missing:
        raise ExportNotFoundError(
            f"{export_dir}: incomplete PRM export, missing {missing}; expected config.json, model "
            f"safetensors, {prm.HEAD_FILE} and tokenizer files (the training export writes all of them)")


def load_scorer(export_dir: str | os.PathLike, *, batch_size: int = 16, dtype: str = "float32",
                seq_buckets: Sequence[int] = DEFAULT_SEQ_BUCKETS,
                patch_buckets: Sequence[int] = DEFAULT_PATCH_BUCKETS,
                progress: bool = False, desc: str | None = None, **processor_overrides) -> PRMScorer:
    """A :class:`PRMScorer` for an exported PRM directory (``prm.save`` + tokenizer files).

    Image settings: ``processor_overrides`` (``max_image_side``, ``min_pixels``,
    ``max_pixels``; None values are ignored) win; otherwise the directory's
    ``preprocessor_config.json``; without one (the demo export, offline tokenizer) the
    training loop's defaults :data:`TRAINING_PROCESSOR_DEFAULTS`, the settings its data
    was encoded with.

    Raises:
      ExportNotFoundError: the directory or one of its required files is missing.
    """
    export_dir = os.fspath(export_dir)
    _check_export(export_dir)
    config, params = prm.load(export_dir, dtype=dtype)
    overrides = {k: v for k, v in processor_overrides.items() if v is not None}
    if not os.path.isfile(os.path.join(export_dir, "preprocessor_config.json")):
        overrides = {**TRAINING_PROCESSOR_DEFAULTS, **overrides}
    elif "max_image_side" not in overrides:
        overrides["max_image_side"] = TRAINING_PROCESSOR_DEFAULTS["max_image_side"]
    processor = Processor.from_directory(export_dir, vision=config.vision, **overrides)
    return PRMScorer(config, params, processor, batch_size=batch_size, seq_buckets=seq_buckets,
                     patch_buckets=patch_buckets, progress=progress, desc=desc or os.path.basename(
                         os.path.dirname(os.path.normpath(export_dir))) or "scoring")
