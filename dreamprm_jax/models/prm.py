"""The DreamPRM process reward model: Qwen2-VL + Linear(vocab -> 1) + sigmoid.

For a tokenised (question, image, partial chain of thought) the reward is read at the last
real token ``t_b = max{t : attention_mask[b, t] = 1}`` of each row b (mask-based, so left
and right padding both work; DreamPRM's ``logits[:, -1, :]`` is the special case of no right
padding)::

    h_b = hidden_states(backbone, inputs)[b, t_b]           # [H]  final-norm hidden state
    l_b = lm_head(h_b)                                      # [V]  float32 vocabulary logits
    z_b = l_b . w + c                                       # the reward logit, float32
    p_b = sigmoid(z_b)                                      # the reward probability

with ``w = head["kernel"][:, 0]`` ``[V]`` and ``c = head["bias"][0]`` (DreamPRM's ``self.LN =
nn.Linear(vocab_size, 1)``, applied to the float32 logits). Only the gathered ``[B, H]`` rows go
through the ``lm_head``: the ``[B, L, V]`` logits are never formed (for Qwen2-VL-2B, V = 151936,
that tensor alone would be ``B * L * 600 KB``).

``score`` returns both ``p`` and ``z``. The meta (aggregation) loss needs the log-odds
``log(p / (1 - p))``, which *is* ``z``: use ``z`` directly, never recompute it from ``p`` (p
rounds to exactly 1.0 in float32 once z > ~17, and the log-odds would become inf).

A cheaper alternative head, ``hidden_head`` = Linear(H -> 1) on ``h_b`` (no vocabulary
projection at all), is available with ``init(..., head="hidden")``; it is *not* DreamPRM's
head, so results with it are a variant.

Parameters: ``{"backbone": qwen2_vl params, "head": {"kernel": [V, 1], "bias": [1]}}`` (or
``"hidden_head": {"kernel": [H, 1], "bias": [1]}`` instead of ``"head"``).

:class:`ProcessRewardModel` is the same model as a Flax NNX module whose attribute paths are
these keys (``ProcessRewardModel.from_pretrained(export_dir).score_steps(meta_batch)``).
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dreamprm_jax.models import qwen2_vl
from dreamprm_jax.models.qwen2_vl.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from dreamprm_jax.models.qwen2_vl.modules import Linear, Qwen2VL, dtype_policy

__all__ = [
    "HEAD_FILE",
    "HEADS",
    "ProcessRewardModel",
    "head_logit",
    "init",
    "last_token_index",
    "load",
    "save",
    "score",
]

HEAD_FILE = "prm_head.safetensors"
#: head kind -> (params key, tensor prefix in prm_head.safetensors)
HEADS = {"vocab": ("head", "LN"), "hidden": ("hidden_head", "hidden_head")}


def _head_kind(params) -> str:
    kinds = [k for k, (key, _) in HEADS.items() if key in params]
    if len(kinds) != 1:
        raise ValueError(
            f"prm params must hold exactly one head among {[key for key, _ in HEADS.values()]}, "
            f"found keys {sorted(params)}"
        )
    return kinds[0]


def _head_in_dim(config, kind: str) -> int:
    return config.text.vocab_size if kind == "vocab" else config.text.hidden_size


def init(config, rng, backbone=None, *, head: str = "vocab", param_dtype=jnp.float32) -> dict:
    """PRM parameters: the backbone (given, or ``qwen2_vl.init_params``) and a fresh head.

    The head follows ``torch.nn.Linear``'s default init, as in DreamPRM:
    ``kernel, bias ~ U(-1/sqrt(n), 1/sqrt(n))`` with ``n`` the input size (V, or H for the
    ``"hidden"`` head). Drawn in float32, stored as ``param_dtype`` (a given backbone is kept
    as it is).
    """
    if head not in HEADS:
        raise ValueError(f"prm.init: head must be one of {sorted(HEADS)}, got {head!r}")
    k_backbone, k_kernel, k_bias = jax.random.split(rng, 3)
    if backbone is None:
        backbone = qwen2_vl.init_params(config, k_backbone, param_dtype)
    n = _head_in_dim(config, head)
    bound = 1.0 / np.sqrt(n)
    head_params = {
        "kernel": jax.random.uniform(k_kernel, (n, 1), jnp.float32, -bound, bound).astype(param_dtype),  # [n, 1]
        "bias": jax.random.uniform(k_bias, (1,), jnp.float32, -bound, bound).astype(param_dtype),  # [1]
    }
    return {"backbone": backbone, HEADS[head][0]: head_params}


def last_token_index(attention_mask) -> jax.Array:
    """Index of the last real token per row, ``max{t : mask[b, t] = 1}`` ``[B]`` int32.

    Rows without any real token give ``L - 1`` (harmless: such rows are masked by the
    caller's ``sample_mask``).
    """
    mask = jnp.asarray(attention_mask) > 0  # [B, L]
    length = mask.shape[-1]
    return (length - 1 - jnp.argmax(mask[:, ::-1], axis=-1)).astype(jnp.int32)


def head_logit(features, head) -> jax.Array:
    """``z = features . kernel[:, 0] + bias[0]`` in float32 (highest matmul precision) ``[B]``;
    in float64 for float64 features (a float64 model)."""
    dtype = jnp.promote_types(features.dtype, jnp.float32)
    features = features.astype(dtype)  # [B, n]
    z = jnp.einsum("bn,no->bo", features, head["kernel"].astype(dtype), precision=jax.lax.Precision.HIGHEST)
    return (z + head["bias"].astype(dtype))[:, 0]  # [B]


def score(config, params, inputs: qwen2_vl.ModelInputs):
    """Reward probabilities and logits for the model inputs of a batch (``qwen2_vl.prepare_batch``).

    Args:
      config: the backbone's ``Qwen2VLConfig`` (static under jit).
      params: ``{"backbone": ..., "head": ...}`` (or ``"hidden_head"``).
      inputs: ``input_ids [B, L]``, ``attention_mask [B, L]``, ``position_ids [3, B, L]`` and
        the optional image fields. Packed meta rows (``data.batching.BatchSpec(...,
        pack_chains=True)``) add ``branch_ids [B, L]`` and ``score_index [B, S]``: then row ``b``
        is scored at its ``S`` positions and the outputs are ``[B * S]``, row-major.

    Returns:
      ``(probs [B] float32, logits [B] float32)`` with ``probs = sigmoid(logits)``; ``logits``
      is the log-odds ``log(p / (1 - p))`` computed without forming ``p``.
    """
    kind = _head_kind(params)
    backbone = params["backbone"]
    hidden = qwen2_vl.hidden_states(config, backbone, inputs)  # [B, L, H]
    if inputs.score_index is not None:  # packed rows: S scored positions per row, flattened row-major
        index = inputs.score_index  # [B, S]
        last = jnp.take_along_axis(hidden, index[:, :, None], axis=1)  # [B, S, H]
        last = last.reshape(-1, last.shape[-1])  # [B*S, H]
    else:
        index = last_token_index(inputs.attention_mask)  # [B]
        last = jnp.take_along_axis(hidden, index[:, None, None], axis=1)[:, 0]  # [B, H]
    if kind == "vocab":
        features = qwen2_vl.lm_head(config, backbone, last)  # [B, V] float32
    else:
        features = last  # [B, H]
    z = head_logit(features, params[HEADS[kind][0]])  # [B]
    return jax.nn.sigmoid(z), z


# ---------------------------------------------------------------------------- files
def save(path: str | os.PathLike, config, params) -> str:
    """Backbone via ``save_checkpoint`` (transformers-loadable) + the head in ``prm_head.safetensors``.

    The head file stores PyTorch ``nn.Linear`` layout: ``LN.weight [1, V]``, ``LN.bias [1]``
    (DreamPRM's attribute name), or ``hidden_head.weight [1, H]`` / ``hidden_head.bias``.
    """
    from safetensors.numpy import save_file

    path = os.fspath(path)
    kind = _head_kind(params)
    key, prefix = HEADS[kind]
    save_checkpoint(path, config, params["backbone"])
    head = params[key]
    tensors = {
        f"{prefix}.weight": np.ascontiguousarray(np.asarray(head["kernel"], np.float32).T),  # [1, n]
        f"{prefix}.bias": np.asarray(head["bias"], np.float32).reshape(1),  # [1]
    }
    save_file(tensors, os.path.join(path, HEAD_FILE), metadata={"format": "pt", "head": kind})
    return path


def load(path: str | os.PathLike, *, dtype: str = "float32", remat: str = "none"):
    """``(config, prm params)`` from a directory written by :func:`save` (numpy leaves).

    Raises:
      CheckpointError: as ``load_checkpoint`` for the backbone; for the head, naming
        ``prm_head.safetensors`` when it is missing, corrupt, or holds a tensor of the wrong
        name, shape or dtype.
    """
    from safetensors import SafetensorError, safe_open

    path = os.fspath(path)
    config, backbone = load_checkpoint(path, dtype=dtype, remat=remat)
    file = os.path.join(path, HEAD_FILE)
    if not os.path.isfile(file):
        raise CheckpointError(f"{file}: missing; a PRM directory holds the reward head beside the backbone")
    try:
        with safe_open(file, framework="numpy") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{file}: not a valid safetensors file ({exc})") from exc
    kind = meta.get("head") or next((k for k, (_, p) in HEADS.items() if f"{p}.weight" in tensors), "vocab")
    if kind not in HEADS:
        raise CheckpointError(f"{file}: metadata head={kind!r}, expected one of {sorted(HEADS)}")
    key, prefix = HEADS[kind]
    n = _head_in_dim(config, kind)
    expected = {f"{prefix}.weight": (1, n), f"{prefix}.bias": (1,)}
    for name, shape in expected.items():
        if name not in tensors:
            raise CheckpointError(f"{file}: tensor {name!r} missing (found {sorted(tensors)}); expected shape {shape}")
        t = tensors[name]
        if not np.issubdtype(t.dtype, np.floating):
            raise CheckpointError(f"{file}: tensor {name!r} has dtype {t.dtype}; expected a floating-point tensor")
        if tuple(t.shape) != shape:
            raise CheckpointError(
                f"{file}: tensor {name!r} has shape {tuple(t.shape)}, expected {shape} "
                f"({'vocab_size' if kind == 'vocab' else 'hidden_size'} {n} from config.json)"
            )
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise CheckpointError(f"{file}: unexpected tensor(s) {extra}; expected only {sorted(expected)}")
    head = {
        "kernel": np.ascontiguousarray(tensors[f"{prefix}.weight"].astype(np.float32).T),  # [n, 1]
        "bias": tensors[f"{prefix}.bias"].astype(np.float32),  # [1]
    }
    return config, {"backbone": backbone, key: head}


def describe(params) -> str:
    """One line: head kind and parameter counts (for logs)."""
    kind = _head_kind(params)
    count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))  # noqa: E731
    return json.dumps({"head": kind, "backbone_params": count(params["backbone"]),
                       "head_params": count(params[HEADS[kind][0]])})


# ---------------------------------------------------------------------------- the NNX module
class ProcessRewardModel(nnx.Module):
    """The PRM as a Flax NNX module: ``backbone`` (a :class:`~dreamprm_jax.models.Qwen2VL`) and
    ``head`` (``kernel [V, 1]``, ``bias [1]``), or ``hidden_head`` (``[H, 1]``) for ``head="hidden"``.

    Attribute paths are the keys of the functional parameter tree (``init`` / ``load``), so
    ``nnx.to_pure_dict(nnx.state(prm_model, nnx.Param))`` is what ``score`` and the trainer read,
    and every method computes with those pure functions (the same numbers, bit for bit).

    Args:
      config: the backbone's ``Qwen2VLConfig``.
      head: ``"vocab"`` (DreamPRM's Linear(V -> 1) on the vocabulary logits) or ``"hidden"``.
      dtype, param_dtype: compute and storage dtypes (see ``qwen2_vl.modules``).
      rngs: draws the parameters as :func:`init` does. Works under ``nnx.eval_shape``.
      params: the functional tree to hold instead (see :meth:`from_params`).
    """

    def __init__(self, config, *, head: str = "vocab", dtype=None, param_dtype=jnp.float32,
                 rngs: nnx.Rngs | None = None, params: dict | None = None):
        config, param_dtype = dtype_policy(config, dtype, param_dtype)
        if params is None:
            if rngs is None:
                raise ValueError("ProcessRewardModel: pass rngs=nnx.Rngs(seed) to draw the parameters, or params=")
            params = init(config, rngs.params(), head=head, param_dtype=param_dtype)
        kind = _head_kind(params)
        self.config = config
        self.backbone = Qwen2VL.from_params(config, params["backbone"], param_dtype=param_dtype)
        setattr(self, HEADS[kind][0], Linear(params[HEADS[kind][0]], param_dtype=param_dtype))

    @classmethod
    def from_params(cls, config, params: dict, *, dtype=None, param_dtype=jnp.float32) -> "ProcessRewardModel":
        """The module holding ``params`` (``{"backbone": ..., "head": ...}``), cast to ``param_dtype``."""
        return cls(config, dtype=dtype, param_dtype=param_dtype, params=params)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype=None, param_dtype=jnp.float32,
                        remat: str = "none") -> "ProcessRewardModel":
        """Load a PRM directory written by :func:`save` / :meth:`save_pretrained` (a trained
        run's ``export/``). ``dtype=None`` computes in float32."""
        config, params = load(path, remat=remat)
        return cls.from_params(config, params, dtype=dtype, param_dtype=param_dtype)

    def save_pretrained(self, path: str | os.PathLike) -> str:
        """The backbone as a transformers checkpoint plus ``prm_head.safetensors`` (:func:`save`)."""
        return save(path, self.config, self.params())

    def params(self) -> dict:
        """The parameters as the functional tree ``{"backbone": ..., "head": ...}``."""
        return nnx.to_pure_dict(nnx.state(self, nnx.Param))

    def score(self, inputs: qwen2_vl.ModelInputs):
        """``(probs, logits)`` ``[B]`` (or ``[B * S]`` for packed rows) as :func:`score`; traceable."""
        return score(self.config, self.params(), inputs)

    def score_steps(self, batch):
        """Step rewards of a meta batch of ``M`` chains x ``S`` steps (``data.batching.collate_meta``).

        Returns ``(probs, logits)`` ``[M, S]`` float32: ``probs[m, s]`` is the reward of step
        ``s + 1`` of chain ``m`` (read at the last token of that step's prefix), ``logits`` its
        log-odds. Entries where ``batch.step_mask`` is 0 (steps a chain does not have, dummy
        chains) are set to 0. Traceable (jit it for repeated use).
        """
        probs, z = self.score(batch.inputs)  # [M * S]
        mask = jnp.asarray(batch.step_mask) > 0  # [M, S]
        probs = jnp.where(mask, probs.reshape(mask.shape), 0.0)
        z = jnp.where(mask, z.reshape(mask.shape), 0.0)
        return probs, z
