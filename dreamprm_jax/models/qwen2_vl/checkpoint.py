"""Qwen2-VL checkpoints on the local disk: safetensors in, safetensors out, never the network.

A checkpoint directory holds ``config.json`` and either ``model.safetensors`` or the shards
listed by ``model.safetensors.index.json`` (``{"weight_map": {tensor name: shard file}}``).
Tensor names may be hub names (``model.layers.*``, ``visual.*``, ``lm_head.weight``) or
transformers-5 names (``model.language_model.*``, ``model.visual.*``); both map onto the
parameter tree through ``convert.normalize_hf_name`` / ``convert.params_from_hf``.

Memory: tensors are read one at a time (``safe_open``, memory-mapped) and copied into
preallocated float32 stacked arrays, so the peak host memory is about one model copy plus
one tensor. Saving streams tensor by tensor into one ``model.safetensors`` the same way.

Safety: pickled checkpoints (``*.bin``, ``*.pt``, ``*.pth``, ``*.ckpt``, ``*.pkl``) are
refused: unpickling runs arbitrary code from the file. Convert them once, in a trusted
environment, with transformers' ``save_pretrained(..., safe_serialization=True)``.

Dtypes: F32 / F16 / BF16 / F64 tensors are read and cast to float32 (BF16 via the "flax"
framework of ``safe_open``, since numpy has no bfloat16); any other dtype is an error.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator

import numpy as np

from .config import Qwen2VLConfig
from .convert import hf_from_params, params_from_hf

__all__ = ["CheckpointError", "load_checkpoint", "save_checkpoint", "read_config", "PICKLE_SUFFIXES"]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_FLOAT_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "BF16": None}
# safetensors dtype names -> numpy, for the streaming writer
_NP_TO_ST = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.float64): "F64"}
# Names the loader skips silently: files in a PRM directory that are not backbone weights.
_NOT_BACKBONE = ("prm_head.safetensors",)


class CheckpointError(ValueError):
    """A checkpoint directory, file or tensor is not what a Qwen2-VL checkpoint must be."""


# ---------------------------------------------------------------------------- reading
def read_config(path: str | os.PathLike, *, dtype: str = "float32", remat: str = "none") -> Qwen2VLConfig:
    """``Qwen2VLConfig`` from ``path/config.json`` (either layout), naming the file on error."""
    path = os.fspath(path)
    _check_directory(path)
    cfg_file = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(cfg_file):
        raise CheckpointError(
            f"{cfg_file}: missing; a Qwen2-VL checkpoint directory needs config.json beside its safetensors"
        )
    try:
        with open(cfg_file, encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{cfg_file}: cannot read the JSON ({exc})") from exc
    try:
        return Qwen2VLConfig.from_hf_dict(d, dtype=dtype, remat=remat)
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{cfg_file}: not a usable Qwen2-VL config ({exc})") from exc


def load_checkpoint(path: str | os.PathLike, *, dtype: str = "float32", remat: str = "none"):
    """Read a local Qwen2-VL checkpoint directory into ``(config, params)``.

    Args:
      path: a directory with ``config.json`` and ``model.safetensors`` or
        ``model.safetensors.index.json`` + shards. Nothing is downloaded.
      dtype, remat: run-time policies stored on the returned config (compute dtype,
        rematerialisation); the parameters are always float32 master weights.

    Returns:
      ``(Qwen2VLConfig, params)`` with numpy float32 leaves in the parameter tree (:func:`param_shapes`)
      (``jax.device_put`` them, or let the first jitted call do it).

    Raises:
      CheckpointError: naming the directory / file / tensor and the expectation, for a
        missing directory or config.json, pickled weights, a corrupt safetensors file, a
        missing / unexpected / mis-shaped / non-float tensor, or an index pointing at a
        missing shard.
    """
    path = os.fspath(path)
    config = read_config(path, dtype=dtype, remat=remat)
    files = weight_files(path)
    where = {"file": None}

    def tensors() -> Iterator[tuple[str, np.ndarray]]:
        for file, names in files:
            where["file"] = file
            yield from _read_safetensors(file, names)
        where["file"] = None

    try:
        params = params_from_hf(config, tensors())
    except CheckpointError:
        raise
    except ValueError as exc:
        origin = where["file"] or path
        raise CheckpointError(
            f"{origin}: {exc} (expected shapes follow from {os.path.join(path, CONFIG_FILE)}; "
            "do config.json and the weights belong together?)"
        ) from exc
    return config, params


def weight_files(path: str) -> list[tuple[str, list[str] | None]]:
    """The safetensors files of a checkpoint, each with the tensor names the index assigns it.

    ``None`` as names means "every tensor in the file" (single-file checkpoints).
    """
    _check_directory(path)
    index_file = os.path.join(path, INDEX_FILE)
    single = os.path.join(path, WEIGHTS_FILE)
    if os.path.isfile(index_file):
        try:
            with open(index_file, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(
                f"{index_file}: cannot read the shard index ({type(exc).__name__}: {exc}); "
                'expected {"weight_map": {tensor name: shard file}}'
            ) from exc
        shards: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            shards.setdefault(shard, []).append(name)
        out = []
        for shard in sorted(shards):
            file = os.path.join(path, shard)
            _refuse_pickle(file)
            if not os.path.isfile(file):
                raise CheckpointError(
                    f"{file}: shard listed in {index_file} (for {shards[shard][0]!r} and "
                    f"{len(shards[shard]) - 1} more tensors) does not exist"
                )
            out.append((file, shards[shard]))
        return out
    if os.path.isfile(single):
        return [(single, None)]
    pickled = sorted(f for f in os.listdir(path) if f.endswith(PICKLE_SUFFIXES))
    if pickled:
        _refuse_pickle(os.path.join(path, pickled[0]))
    others = sorted(f for f in os.listdir(path) if f.endswith(".safetensors") and f not in _NOT_BACKBONE)
    raise CheckpointError(
        f"{path}: no {WEIGHTS_FILE} and no {INDEX_FILE}"
        + (f" (found {others}, but without an index the shards are ambiguous)" if others else "")
    )


def _check_directory(path: str) -> None:
    if os.path.isfile(path):
        _refuse_pickle(path)
        raise CheckpointError(f"{path}: is a file; expected a checkpoint directory (config.json + safetensors)")
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: checkpoint directory does not exist (only local directories are read)")


def _refuse_pickle(file: str) -> None:
    if file.endswith(PICKLE_SUFFIXES):
        raise CheckpointError(
            f"{file}: pickled PyTorch checkpoints are refused: loading a pickle can execute arbitrary "
            "code stored in the file. Convert it to safetensors once, in a trusted environment "
            "(transformers: model.save_pretrained(out_dir, safe_serialization=True))"
        )


def _read_safetensors(file: str, names: list[str] | None) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (name, float32 array) from one safetensors file, one tensor at a time."""
    from safetensors import SafetensorError, safe_open

    try:
        handle = safe_open(file, framework="numpy")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{file}: not a valid safetensors file ({exc}); it may be truncated or corrupt"
        ) from exc
    flax_handle = None
    with handle as f:
        keys = set(f.keys())
        if names is None:
            wanted = sorted(keys)
        else:
            absent = [n for n in names if n not in keys]
            if absent:
                raise CheckpointError(
                    f"{file}: tensor {absent[0]!r} is listed in {INDEX_FILE} for this shard but is not in the file"
                    + (f" ({len(absent)} such tensors)" if len(absent) > 1 else "")
                )
            wanted = names
        for name in wanted:
            st_dtype = f.get_slice(name).get_dtype()
            if st_dtype not in _FLOAT_DTYPES:
                raise CheckpointError(
                    f"{file}: tensor {name!r} has dtype {st_dtype}; expected a floating-point tensor "
                    f"({'/'.join(_FLOAT_DTYPES)})"
                )
            try:
                if st_dtype == "BF16":  # numpy has no bfloat16: read through JAX (ml_dtypes), cast on the host
                    if flax_handle is None:
                        flax_handle = safe_open(file, framework="flax")
                    array = np.asarray(flax_handle.get_tensor(name)).astype(np.float32)
                else:
                    array = f.get_tensor(name).astype(np.float32, copy=False)
            except (SafetensorError, OSError, ValueError) as exc:
                raise CheckpointError(f"{file}: cannot read tensor {name!r} ({exc}); the file may be corrupt") from exc
            yield name, array


# ---------------------------------------------------------------------------- writing
def save_checkpoint(path: str | os.PathLike, config: Qwen2VLConfig, params) -> str:
    """Write ``config.json`` (hub layout) and ``model.safetensors`` (hub names, float32).

    transformers' ``Qwen2VLForConditionalGeneration.from_pretrained(path)`` loads the result.
    Tensors are converted and written one at a time (two passes over the tree: shapes first,
    then data), so the extra host memory is about one tensor. Returns ``path``.
    """
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(config.to_hf_dict(), f, indent=2, sort_keys=True)
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, array in hf_from_params(config, params):
        nbytes = array.size * array.dtype.itemsize
        header[name] = {
            "dtype": _NP_TO_ST[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8-byte alignment
    out = os.path.join(path, WEIGHTS_FILE)
    tmp = out + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, array in hf_from_params(config, params):
            if header[name]["shape"] != list(array.shape):  # the tree changed between the two passes
                raise CheckpointError(f"{out}: tensor {name!r} changed shape while being written")
            f.write(np.ascontiguousarray(array).astype("<" + array.dtype.str[1:], copy=False).tobytes())
    os.replace(tmp, out)
    return path
