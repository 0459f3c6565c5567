"""Tokenised, patchified DreamPRM data as memory-mapped Arrow tables, cached on disk.

Pipeline: records file --:mod:`records` (validate everything)--> processor.encode per
sample --> two Hugging Face ``datasets.Dataset`` tables saved with ``save_to_disk``:

``samples`` (one row per model sequence)
    ``input_ids``   int32 [L] (variable length)
    ``length``      int32, L
    ``image_index`` int32, row of ``images`` (-1: text only)
    ``num_patches`` int32, P of that image (0: text only)
    ``label``       float32, accuracy (train) or the chain's true_false (meta)
    ``domain_id``   int32, index into ``info["domains"]`` (train; 0 for meta)
    ``record_index`` int32, index of the record in the validated list
    train only: ``record_key`` string, the record's unique key
    (:func:`~dreamprm_jax.data.records.record_keys`: ``"<id>/<sid>"`` where the records carry them).
    A training table has one row per record, in record order.
    meta only: ``chain_index`` int32, ``step`` int32 (1-based), ``num_steps`` int32,
    ``question_index`` int32 (chains of one question share it, numbered in order of first
    appearance; :attr:`~dreamprm_jax.data.records.MetaRecord.question_key`).
    Meta rows are chain-major: chain c's S_c rows are contiguous, in step order.

``images`` (one row per distinct image file, shared by all its samples)
    ``pixel_values`` float32 [P * D] (flattened; D = ``info["patch_dim"]``)
    ``image_grid_thw`` int64 [3]
    ``num_patches`` int32

Storing each distinct image once (rather than once per sample) is a deliberate change
from "pixel values per sample": DreamPRM has many partial chains per question image
(and S prefixes per meta chain), and at 512 px an image is ~1,300 x 1,176 float32 ~ 6 MB.

Both tables are streamed to Arrow (``Dataset.from_generator``; an image's patches wait in
a temporary ``.npy`` file, not in memory), then ``save_to_disk``; readers get them back
memory-mapped with ``load_from_disk``.  Text-only data has an empty ``images`` table.

Cache key (sha256, hex) over: a format version, the kind (train / meta), the records
file's bytes, every option that changes the result (image root, domains, skip mode, step
mode, TRL settings), every distinct image's path relative to the root and its bytes, the
processor's settings (its primitive attributes, or ``processor.fingerprint()`` when it
has one), the tokenizer (serialised ``tokenizers`` JSON, else its vocabulary) and the
source of the processor's class.  The tables live in ``cache_dir/<kind>-<key>/``; they are
written to a temporary folder first and renamed, so a crash never leaves a half cache.
Validation always runs (it is cheap next to encoding and its errors must come first);
on a cache hit the encoder is never called.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import inspect
import json
import os
import shutil
import tempfile
from collections import Counter
from typing import Any, Sequence

import numpy as np

from dreamprm_jax.data.records import (Loaded, MetaRecord, TrainRecord, load_meta_records, load_train_records,
                                       record_keys)

__all__ = ["PreparedData", "build_train_dataset", "build_meta_dataset", "processor_fingerprint", "CACHE_VERSION"]

CACHE_VERSION = "dreamprm-jax-data-v4"


@dataclasses.dataclass
class PreparedData:
    """Arrow tables (memory-mapped) plus the facts a trainer needs.

    ``info``: kind, key, domains (tuple), patch_dim, num_read (records in the file),
    num_records (kept), num_samples, skipped (dict reason -> count), first_errors (the first
    few bad records: file, record, line, field, reason, message) and, for meta, num_chains /
    max_steps.  ``from_cache`` tells whether
    preprocessing was skipped.
    """

    samples: Any  # datasets.Dataset
    images: Any  # datasets.Dataset
    info: dict
    path: str
    from_cache: bool

    @property
    def domains(self) -> tuple[str, ...]:
        return tuple(self.info["domains"])

    @property
    def skipped(self) -> Counter:
        return Counter(self.info["skipped"])

    @property
    def num_read(self) -> int:
        """Records read from the file (kept + skipped; a TRL row counts once)."""
        return int(self.info["num_read"])

    def chain_rows(self) -> np.ndarray:
        """Meta: ``[num_chains, 2]`` int64 (first row, number of steps) of each chain."""
        chain = np.asarray(self.samples["chain_index"], dtype=np.int64)
        starts = np.flatnonzero(np.r_[True, chain[1:] != chain[:-1]])
        counts = np.diff(np.r_[starts, len(chain)])
        return np.stack([starts, counts], axis=1)

    def chain_questions(self) -> np.ndarray:
        """Meta: ``[num_chains]`` int64, the question index of each chain."""
        return np.asarray(self.samples["question_index"], dtype=np.int64)[self.chain_rows()[:, 0]]

    def record_keys(self) -> list[str]:
        """Train: the unique key of each record (row), in row order."""
        return [str(k) for k in self.samples["record_key"]]


# ----------------------------------------------------------------------------- fingerprints


def _primitive(value) -> bool:
    if isinstance(value, (bool, int, float, str, type(None))):
        return True
    if isinstance(value, (tuple, list)):
        return all(_primitive(v) for v in value)
    return False


def _tokenizer_hash(tokenizer) -> str:
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        h.update(backend.to_str().encode())
    elif hasattr(tokenizer, "get_vocab"):
        h.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    else:
        h.update(repr(tokenizer).encode())
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        h.update(template.encode())
    return h.hexdigest()


def processor_fingerprint(processor) -> str:
    """A stable hash of everything in ``processor`` that changes its output (see module doc).

    Public attributes holding plain values (numbers, strings, tuples of them) count as
    settings; keep mutable counters and caches in ``_private`` attributes.
    """
    fp = getattr(processor, "fingerprint", None)
    if callable(fp):
        return str(fp())
    h = hashlib.sha256()
    cls = type(processor)
    h.update(f"{cls.__module__}.{cls.__qualname__}".encode())
    try:
        h.update(inspect.getsource(cls).encode())
    except (OSError, TypeError):
        pass
    settings = {k: v for k, v in sorted(vars(processor).items()) if not k.startswith("_") and _primitive(v)}
    h.update(json.dumps(settings, sort_keys=True, default=repr).encode())
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is not None:
        h.update(_tokenizer_hash(tokenizer).encode())
    return h.hexdigest()


def _file_hash(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _cache_key(kind: str, records_path: str, records: Sequence, image_root: str, processor, options: dict) -> str:
    h = hashlib.sha256()
    h.update(CACHE_VERSION.encode())
    h.update(kind.encode())
    h.update(_file_hash(records_path).encode())
    h.update(json.dumps(options, sort_keys=True, default=repr).encode())
    root = os.path.abspath(image_root)
    for image in sorted({r.image_path for r in records if r.image_path is not None}):
        h.update(os.path.relpath(image, root).encode())
        h.update(_file_hash(image).encode())
    h.update(processor_fingerprint(processor).encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------- encoding


def _features(kind: str):
    from datasets import Features, Sequence as Seq, Value

    cols = {
        "input_ids": Seq(Value("int32")),
        "length": Value("int32"),
        "image_index": Value("int32"),
        "num_patches": Value("int32"),
        "label": Value("float32"),
        "domain_id": Value("int32"),
        "record_index": Value("int32"),
    }
    if kind == "train":
        cols.update(record_key=Value("string"))
    if kind == "meta":
        cols.update(chain_index=Value("int32"), step=Value("int32"), num_steps=Value("int32"),
                    question_index=Value("int32"))
    images = Features({
        "pixel_values": Seq(Value("float32")),
        "image_grid_thw": Seq(Value("int64"), length=3),
        "num_patches": Value("int32"),
    })
    return Features(cols), images


def _open_image(path: str):
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        return im.convert("RGB")


class _Encoder:
    """Encodes samples; remembers each distinct image's patches once."""

    def __init__(self, processor, pixel_dir: str):
        self.processor = processor
        self.pixel_dir = pixel_dir  # each distinct image's patches go to <pixel_dir>/<index>.npy
        self.image_rows: list[dict] = []  # grid and patch count only; pixels stay on disk
        self.image_index: dict[str, int] = {}
        self.patch_dim: int | None = None
        self._pil: tuple[str, Any] | None = None

    def encode(self, text: str, image_path: str | None, where: str) -> tuple[np.ndarray, int, int]:
        idx = self.image_index.get(image_path) if image_path is not None else None
        encode_text = getattr(self.processor, "encode_text", None)
        if idx is not None and encode_text is not None:
            # An image seen before (the demo: 10 step records per image): its patches are on disk,
            # only the text is new. Same ids as a full encode, a fraction of the time.
            row = self.image_rows[idx]
            ids = np.asarray(encode_text(text, row["image_grid_thw"].reshape(1, 3)), dtype=np.int32).reshape(-1)  # [L]
            return ids, idx, row["num_patches"]
        image = None
        if image_path is not None:
            if self._pil is None or self._pil[0] != image_path:
                self._pil = (image_path, _open_image(image_path))
            image = self._pil[1]
        try:
            enc = self.processor.encode(text, image)
        except Exception as e:  # noqa: BLE001 - whatever the processor raises, name the record
            field = f", field 'image_path' ({image_path})" if image_path is not None else ", field 'input'"
            raise ValueError(f"{where}{field}: the processor failed ({type(e).__name__}: {e})") from e
        ids = np.asarray(enc.input_ids, dtype=np.int32).reshape(-1)  # [L]
        if image_path is None:
            return ids, -1, 0
        if enc.pixel_values is None or enc.image_grid_thw is None:
            raise ValueError(f"{where}: processor.encode returned no pixel_values for image {image_path}")
        pixels = np.asarray(enc.pixel_values, dtype=np.float32)  # [P, D]
        grid = np.asarray(enc.image_grid_thw, dtype=np.int64).reshape(-1)  # [3]
        if pixels.ndim != 2 or grid.shape != (3,) or int(np.prod(grid)) != pixels.shape[0]:
            raise ValueError(f"{where}: expected pixel_values [P, D] with P = t*h*w of image_grid_thw; "
                             f"got {pixels.shape} and {grid.tolist()}")
        if self.patch_dim is None:
            self.patch_dim = int(pixels.shape[1])
        elif pixels.shape[1] != self.patch_dim:
            raise ValueError(f"{where}: patch dim {pixels.shape[1]} differs from the first image's {self.patch_dim}")
        idx = self.image_index.get(image_path)
        if idx is None:
            idx = len(self.image_rows)
            self.image_index[image_path] = idx
            np.save(os.path.join(self.pixel_dir, f"{idx}.npy"), pixels.reshape(-1))  # [P * D]
            self.image_rows.append({"image_grid_thw": grid, "num_patches": int(pixels.shape[0])})
        elif self.image_rows[idx]["image_grid_thw"].tolist() != grid.tolist():
            raise ValueError(f"{where}: image {image_path} encoded to a different grid than before")
        return ids, idx, int(pixels.shape[0])


def _from_generator(gen, features, cache_dir: str, fingerprint: str):
    """``Dataset.from_generator``, re-raising the generator's own exception (datasets wraps it)."""
    from datasets import Dataset
    from datasets.exceptions import DatasetGenerationError

    try:
        return Dataset.from_generator(gen, features=features, cache_dir=cache_dir, fingerprint=fingerprint)
    except DatasetGenerationError as e:
        cause = e.__cause__
        if isinstance(cause, Exception):
            raise cause from None
        raise


def _image_rows(encoder: _Encoder):
    for idx, row in enumerate(encoder.image_rows):
        yield {"pixel_values": np.load(os.path.join(encoder.pixel_dir, f"{idx}.npy")), **row}


def _train_rows(records: Sequence[TrainRecord], domains: Sequence[str], encoder: _Encoder):
    domain_id = {d: i for i, d in enumerate(domains)}
    keys = record_keys(records)
    for i, rec in enumerate(records):
        ids, image_index, num_patches = encoder.encode(rec.text, rec.image_path, f"{rec.source[0]}, record {rec.source[1]}")
        yield {"input_ids": ids, "length": len(ids), "image_index": image_index, "num_patches": num_patches,
               "label": rec.accuracy, "domain_id": domain_id[rec.dataset], "record_index": i, "record_key": keys[i]}


def _meta_rows(records: Sequence[MetaRecord], encoder: _Encoder):
    questions: dict[tuple, int] = {}
    for c, rec in enumerate(records):
        question = questions.setdefault(rec.question_key, len(questions))
        for s, prefix in enumerate(rec.steps, start=1):
            ids, image_index, num_patches = encoder.encode(prefix, rec.image_path,
                                                           f"{rec.source[0]}, record {rec.source[1]}, step {s}")
            yield {"input_ids": ids, "length": len(ids), "image_index": image_index, "num_patches": num_patches,
                   "label": float(rec.true_false), "domain_id": 0, "record_index": c,
                   "chain_index": c, "step": s, "num_steps": rec.num_steps, "question_index": question}


@contextlib.contextmanager
def _quiet_progress():
    import datasets

    was_disabled = datasets.is_progress_bar_enabled() is False
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def _load(path: str) -> PreparedData:
    from datasets import load_from_disk

    with open(os.path.join(path, "info.json")) as f:
        info = json.load(f)
    samples = load_from_disk(os.path.join(path, "samples"))
    if info["num_images"]:
        images = load_from_disk(os.path.join(path, "images"))
    else:
        from datasets import Dataset

        features = _features(info["kind"])[1]
        images = Dataset.from_dict({k: [] for k in features}, features=features)
    return PreparedData(samples, images, info, path, from_cache=True)


def _build(kind: str, loaded: Loaded, records_path: str, processor, cache_dir: str, root: str, options: dict) -> PreparedData:
    from datasets import Dataset, load_from_disk

    key = _cache_key(kind, records_path, loaded.records, root, processor, options)
    final = os.path.join(os.fspath(cache_dir), f"{kind}-{key[:32]}")
    if os.path.isfile(os.path.join(final, "info.json")):
        return _load(final)
    os.makedirs(cache_dir, exist_ok=True)
    work = tempfile.mkdtemp(prefix=f".{kind}-{key[:12]}-", dir=cache_dir)
    try:
        sample_features, image_features = _features(kind)
        if not loaded.records:
            raise ValueError(f"{records_path}: no good records to encode")
        pixel_dir = os.path.join(work, "pixels")
        os.makedirs(pixel_dir)
        encoder = _Encoder(processor, pixel_dir)
        rows = (functools.partial(_train_rows, loaded.records, loaded.domains, encoder) if kind == "train"
                else functools.partial(_meta_rows, loaded.records, encoder))
        # streamed to Arrow (bounded memory); fingerprint=key so the processor is never hashed by datasets
        with _quiet_progress():
            samples = _from_generator(rows, sample_features, os.path.join(work, "hf"), f"{key}-samples")
            if encoder.image_rows:
                images = _from_generator(functools.partial(_image_rows, encoder), image_features,
                                         os.path.join(work, "hf"), f"{key}-images")
            else:  # text-only data: no images table (datasets can neither generate nor reload an empty one)
                images = None
            samples.save_to_disk(os.path.join(work, "samples"))
            if images is not None:
                images.save_to_disk(os.path.join(work, "images"))
        del samples, images
        shutil.rmtree(os.path.join(work, "hf"), ignore_errors=True)
        shutil.rmtree(pixel_dir, ignore_errors=True)
        samples = load_from_disk(os.path.join(work, "samples"))
        info = {
            "kind": kind, "key": key, "version": CACHE_VERSION, "records_file": os.path.abspath(records_path),
            "domains": list(loaded.domains), "patch_dim": encoder.patch_dim if encoder.patch_dim is not None
            else getattr(processor, "patch_dim", None),
            "num_records": len(loaded.records), "num_samples": len(samples), "num_images": len(encoder.image_rows),
            "num_read": loaded.num_read, "skipped": dict(loaded.skipped), "skip_examples": dict(loaded.examples),
            "first_errors": [{"file": e.file, "record": e.record, "line": e.line, "field": e.field, "reason": e.reason,
                              "message": str(e)} for e in loaded.first_errors],
            "max_length": int(np.max(np.asarray(samples["length"]))),
            "max_patches": int(np.max(np.asarray(samples["num_patches"]))),
        }
        if kind == "meta":
            info.update(num_chains=len(loaded.records), max_steps=max(r.num_steps for r in loaded.records),
                        num_questions=len({r.question_key for r in loaded.records}))
        with open(os.path.join(work, "info.json"), "w") as f:
            json.dump(info, f, indent=1)
        try:
            os.replace(work, final)
        except OSError:  # another process won the race; use its tables
            shutil.rmtree(work, ignore_errors=True)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    data = _load(final)
    data.from_cache = False
    return data


def build_train_dataset(
    records_path: str | os.PathLike,
    processor,
    cache_dir: str | os.PathLike,
    *,
    image_root: str | os.PathLike | None = None,
    domains: Sequence[str] | None = None,
    on_bad_record: str = "error",
    check_images: bool = True,
    format: str = "auto",
    domain: str | None = None,
    step_separator: str = "\n",
) -> PreparedData:
    """Validate a training-records file, then encode it (or load the cached tables).

    Arguments as :func:`~dreamprm_jax.data.records.load_train_records`; ``processor`` has
    ``encode(text, image) -> EncodedSample`` and, optionally, ``check_image(path)`` (used to
    validate images; else the default processor settings' check).  ``info["domains"]``
    fixes ``domain_id``.
    """
    records_path = os.fspath(records_path)
    loaded = load_train_records(records_path, image_root=image_root, domains=domains, on_bad_record=on_bad_record,
                                check_images=check_images, format=format, domain=domain, step_separator=step_separator,
                                image_check=getattr(processor, "check_image", None))
    root = os.path.abspath(image_root) if image_root is not None else os.path.dirname(os.path.abspath(records_path))
    options = {"domains": list(loaded.domains), "on_bad_record": on_bad_record, "check_images": check_images,
               "format": format, "domain": domain, "step_separator": step_separator, "root": root}
    return _build("train", loaded, records_path, processor, os.fspath(cache_dir), root, options)


def build_meta_dataset(
    records_path: str | os.PathLike,
    processor,
    cache_dir: str | os.PathLike,
    *,
    image_root: str | os.PathLike | None = None,
    on_bad_record: str = "error",
    check_images: bool = True,
    step_mode: str = "strict",
) -> PreparedData:
    """Validate a meta-records file, then encode every step prefix of every chain (cached)."""
    records_path = os.fspath(records_path)
    loaded = load_meta_records(records_path, image_root=image_root, on_bad_record=on_bad_record,
                               check_images=check_images, step_mode=step_mode,
                               image_check=getattr(processor, "check_image", None))
    root = os.path.abspath(image_root) if image_root is not None else os.path.dirname(os.path.abspath(records_path))
    options = {"on_bad_record": on_bad_record, "check_images": check_images, "step_mode": step_mode, "root": root}
    return _build("meta", loaded, records_path, processor, os.fspath(cache_dir), root, options)
