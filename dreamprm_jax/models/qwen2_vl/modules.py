"""Qwen2-VL as Flax NNX modules: a model object over the pure functions of this package.

    from flax import nnx
    from dreamprm_jax.models import Qwen2VL

    model = Qwen2VL.from_pretrained(path, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    logits = model(input_ids, attention_mask, pixel_values=pv, image_grid_thw=thw)  # [B, L, V]
    graphdef, params = nnx.split(model, nnx.Param)   # a pytree for jax.jit / jax.grad / lax.scan
    model.save_pretrained(out_dir)                   # transformers loads it back

Attribute paths are parameter names. Every ``nnx.Param`` sits at the path it has in the
parameter tree of :func:`~dreamprm_jax.models.qwen2_vl.convert.param_shapes` (e.g.
``model.language_model.layers.self_attn.q_proj.kernel``), so
``nnx.to_pure_dict(nnx.state(model, nnx.Param))`` *is* the tree the functional API
(``forward``, ``prm.score``, the trainer, its Orbax checkpoints) reads, and checkpoint
conversion stays the table of ``convert.py``. Blocks and layers are stacked on a leading
``[depth, ...]`` axis of each parameter (one module holds them all), as ``scan_blocks``
consumes them; the fused QKV (vision) and the concatenated q/k/v and gate/up matmuls (text)
are those of the pure functions.

Computation: every ``__call__`` hands its parameters, as that nested dict, to the pure
function of :mod:`.text` / :mod:`.vision` / :mod:`.model`. A module therefore computes the
same numbers as the functional API, bit for bit, and under ``jax.jit`` the two trace to the
same program. Rotary tables, masks and other constants are computed from the inputs; they
are never ``nnx.Param`` (nor any state).

Dtype policy, as in Flax layers: ``param_dtype`` is the storage dtype of the parameters
(float32 master weights by default), ``dtype`` the compute dtype the forward pass casts them
to (float32 or bfloat16; default: the config's). Norm statistics, softmax, rotary angles and
logits stay float32 (``text.accum_dtype``). ``dtype=param_dtype=jnp.float64`` (inside
``jax.enable_x64``) gives a float64 model for reference checks.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .checkpoint import load_checkpoint, save_checkpoint
from .config import DTYPES, Qwen2VLConfig
from .inputs import ModelInputs
from .model import forward, hidden_states, init_params, lm_head, logits
from .text import decoder, dense, layer_norm, rms_norm
from .vision import encode_images, patch_merger

__all__ = [
    "DecoderLayers",
    "Embed",
    "LanguageModel",
    "LayerNorm",
    "Linear",
    "PatchMerger",
    "Qwen2VL",
    "RMSNorm",
    "TextAttention",
    "TextMLP",
    "VisionAttention",
    "VisionBlocks",
    "VisionMLP",
    "VisionTower",
    "dtype_policy",
    "param_dict",
]


def param_dict(module: nnx.Module) -> dict:
    """The module's parameters as the nested dict of arrays the pure functions read."""
    return nnx.to_pure_dict(nnx.state(module, nnx.Param))


def _param(value, param_dtype) -> nnx.Param:
    return nnx.Param(jnp.asarray(value, param_dtype))


def dtype_policy(config: Qwen2VLConfig, dtype=None, param_dtype=jnp.float32) -> tuple[Qwen2VLConfig, np.dtype]:
    """``(config with compute dtype, storage dtype)`` for the ``dtype`` / ``param_dtype`` arguments.

    ``dtype=None`` keeps ``config.dtype``. Raises ValueError for a dtype outside
    ``qwen2_vl.DTYPES`` and for float64 without ``jax.enable_x64`` (JAX would silently store
    and compute float32).
    """
    compute = jnp.dtype(config.dtype if dtype is None else dtype)
    storage = jnp.dtype(param_dtype)
    for name, value in (("dtype", compute), ("param_dtype", storage)):
        if value.name not in DTYPES:
            raise ValueError(f"Qwen2VL: {name}={value.name}; expected one of {DTYPES}")
        if value == jnp.float64 and jax.dtypes.canonicalize_dtype(jnp.float64) != jnp.float64:
            raise ValueError(f"Qwen2VL: {name}=float64 needs 64-bit JAX (jax.enable_x64(True) or "
                             "jax.config.update('jax_enable_x64', True)); without it arrays are float32")
    return config.replace(dtype=compute.name), storage


# ---------------------------------------------------------------------- leaves


class Linear(nnx.Module):
    """``kernel [..., in, out]`` and optional ``bias [..., out]`` (leading axes: stacked blocks)."""

    def __init__(self, p: dict, *, param_dtype=jnp.float32):
        self.kernel = _param(p["kernel"], param_dtype)
        if "bias" in p:
            self.bias = _param(p["bias"], param_dtype)

    def __call__(self, x, dtype=jnp.float32):
        """``x @ kernel + bias`` in ``dtype`` (unstacked modules only)."""
        return dense(x, param_dict(self), dtype)


class Embed(nnx.Module):
    """``embedding [vocab, hidden]``."""

    def __init__(self, p: dict, *, param_dtype=jnp.float32):
        self.embedding = _param(p["embedding"], param_dtype)


class RMSNorm(nnx.Module):
    """``scale [..., dim]``; statistics in float32 (``text.rms_norm``)."""

    def __init__(self, p: dict, eps: float, *, param_dtype=jnp.float32):
        self.scale = _param(p["scale"], param_dtype)
        self.eps = eps

    def __call__(self, x):
        return rms_norm(x, self.scale[...], self.eps)


class LayerNorm(nnx.Module):
    """``scale, bias [..., dim]``; statistics in float32 (``text.layer_norm``)."""

    def __init__(self, p: dict, eps: float = 1e-6, *, param_dtype=jnp.float32):
        self.scale = _param(p["scale"], param_dtype)
        self.bias = _param(p["bias"], param_dtype)
        self.eps = eps

    def __call__(self, x):
        return layer_norm(x, param_dict(self), self.eps)


# ---------------------------------------------------------------------- vision tower


class VisionAttention(nnx.Module):
    """Fused ``qkv [D, E, 3E]`` and ``proj [D, E, E]`` of all ``D`` vision blocks."""

    def __init__(self, p: dict, *, param_dtype=jnp.float32):
        self.qkv = Linear(p["qkv"], param_dtype=param_dtype)
        self.proj = Linear(p["proj"], param_dtype=param_dtype)


class VisionMLP(nnx.Module):
    """``fc1 [D, E, M]`` and ``fc2 [D, M, E]`` of all ``D`` vision blocks."""

    def __init__(self, p: dict, *, param_dtype=jnp.float32):
        self.fc1 = Linear(p["fc1"], param_dtype=param_dtype)
        self.fc2 = Linear(p["fc2"], param_dtype=param_dtype)


class VisionBlocks(nnx.Module):
    """The ``depth`` pre-norm vision blocks, parameters stacked on a leading ``[depth]`` axis."""

    def __init__(self, p: dict, *, param_dtype=jnp.float32):
        self.norm1 = LayerNorm(p["norm1"], param_dtype=param_dtype)
        self.norm2 = LayerNorm(p["norm2"], param_dtype=param_dtype)
        self.attn = VisionAttention(p["attn"], param_dtype=param_dtype)
        self.mlp = VisionMLP(p["mlp"], param_dtype=param_dtype)


class PatchMerger(nnx.Module):
    """LayerNorm ``ln_q`` and the MLP ``mlp_0 -> GELU -> mlp_2``: ``[N, E] -> [N / m^2, hidden]``."""

    def __init__(self, config: Qwen2VLConfig, p: dict, *, param_dtype=jnp.float32):
        self.config = config
        self.ln_q = LayerNorm(p["ln_q"], param_dtype=param_dtype)
        self.mlp_0 = Linear(p["mlp_0"], param_dtype=param_dtype)
        self.mlp_2 = Linear(p["mlp_2"], param_dtype=param_dtype)

    def __call__(self, x):
        return patch_merger(self.config, param_dict(self), x)


class VisionTower(nnx.Module):
    """Patch embedding (the Conv3d as a matmul), the vision blocks and the patch merger."""

    def __init__(self, config: Qwen2VLConfig, p: dict, *, param_dtype=jnp.float32):
        self.config = config
        self.patch_embed = Linear(p["patch_embed"], param_dtype=param_dtype)
        self.blocks = VisionBlocks(p["blocks"], param_dtype=param_dtype)
        self.merger = PatchMerger(config, p["merger"], param_dtype=param_dtype)

    def __call__(self, pixel_values, vision_position_ids, vision_segment_ids, rope=None):
        """Image features ``[N / m^2, hidden]`` for ``pixel_values [N, D]`` (see ``vision.encode_images``)."""
        return encode_images(self.config, param_dict(self), pixel_values, vision_position_ids, vision_segment_ids,
                             rope=rope)


# ---------------------------------------------------------------------- language model


class TextAttention(nnx.Module):
    """``q_proj, k_proj, v_proj`` (with bias) and ``o_proj`` of all ``L`` decoder layers (stacked)."""

    def __init__(self, p: dict, *, param_dtype=jnp.float32):
        self.q_proj = Linear(p["q_proj"], param_dtype=param_dtype)
        self.k_proj = Linear(p["k_proj"], param_dtype=param_dtype)
        self.v_proj = Linear(p["v_proj"], param_dtype=param_dtype)
        self.o_proj = Linear(p["o_proj"], param_dtype=param_dtype)


class TextMLP(nnx.Module):
    """SwiGLU ``gate_proj, up_proj [L, H, I]`` and ``down_proj [L, I, H]`` (stacked)."""

    def __init__(self, p: dict, *, param_dtype=jnp.float32):
        self.gate_proj = Linear(p["gate_proj"], param_dtype=param_dtype)
        self.up_proj = Linear(p["up_proj"], param_dtype=param_dtype)
        self.down_proj = Linear(p["down_proj"], param_dtype=param_dtype)


class DecoderLayers(nnx.Module):
    """The ``num_hidden_layers`` decoder layers, parameters stacked on a leading ``[L]`` axis."""

    def __init__(self, p: dict, eps: float, *, param_dtype=jnp.float32):
        self.input_layernorm = RMSNorm(p["input_layernorm"], eps, param_dtype=param_dtype)
        self.post_attention_layernorm = RMSNorm(p["post_attention_layernorm"], eps, param_dtype=param_dtype)
        self.self_attn = TextAttention(p["self_attn"], param_dtype=param_dtype)
        self.mlp = TextMLP(p["mlp"], param_dtype=param_dtype)


class LanguageModel(nnx.Module):
    """Token embedding, the M-RoPE decoder layers and the final RMSNorm."""

    def __init__(self, config: Qwen2VLConfig, p: dict, *, param_dtype=jnp.float32):
        self.config = config
        eps = config.text.rms_norm_eps
        self.embed_tokens = Embed(p["embed_tokens"], param_dtype=param_dtype)
        self.layers = DecoderLayers(p["layers"], eps, param_dtype=param_dtype)
        self.norm = RMSNorm(p["norm"], eps, param_dtype=param_dtype)

    def __call__(self, inputs_embeds, position_ids, attention_mask, branch_ids=None, rope=None):
        """Final-norm hidden states ``[B, L, H]`` for ``inputs_embeds [B, L, H]`` (see ``text.decoder``)."""
        return decoder(self.config, param_dict(self), inputs_embeds, position_ids, attention_mask, branch_ids,
                       rope=rope)


# ---------------------------------------------------------------------- the model


class Qwen2VL(nnx.Module):
    """Qwen2VLForConditionalGeneration: ``visual``, ``language_model`` and (untied) ``lm_head``.

    Args:
      config: the architecture (``qwen2_vl.qwen2_vl_2b()``, ``tiny()``, ``demo()``, or
        ``read_config``); its ``dtype`` is the default compute dtype, its ``remat`` the
        rematerialisation policy.
      dtype: compute dtype (``jnp.float32`` / ``jnp.bfloat16``; ``None``: ``config.dtype``).
      param_dtype: storage dtype of the parameters (default float32 master weights).
      rngs: draws the initial parameters (``init_params``: N(0, initializer_range^2) kernels
        and embeddings, zero biases, unit norm scales). Works under ``nnx.eval_shape``.
      params: the parameter tree to hold instead of drawing one (see :meth:`from_params`).

    Attributes: ``config`` (with the compute dtype), ``dtype``, ``param_dtype``.
    """

    def __init__(self, config: Qwen2VLConfig, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs | None = None,
                 params: dict | None = None):
        config, param_dtype = dtype_policy(config, dtype, param_dtype)
        if params is None:
            if rngs is None:
                raise ValueError("Qwen2VL: pass rngs=nnx.Rngs(seed) to draw the parameters, or params=")
            params = init_params(config, rngs.params(), param_dtype)
        self.config = config
        self.dtype = jnp.dtype(config.dtype)
        self.param_dtype = param_dtype
        self.visual = VisionTower(config, params["visual"], param_dtype=param_dtype)
        self.language_model = LanguageModel(config, params["language_model"], param_dtype=param_dtype)
        if not config.text.tie_word_embeddings:
            self.lm_head = Linear(params["lm_head"], param_dtype=param_dtype)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_params(cls, config: Qwen2VLConfig, params: dict, *, dtype=None, param_dtype=jnp.float32) -> "Qwen2VL":
        """The model holding ``params`` (the functional tree, e.g. from ``load_checkpoint``),
        cast to ``param_dtype``."""
        return cls(config, dtype=dtype, param_dtype=param_dtype, params=params)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype=None, param_dtype=jnp.float32,
                        remat: str = "none") -> "Qwen2VL":
        """Load a local transformers checkpoint directory (``load_checkpoint``: safetensors only,
        never the network). ``dtype=None`` computes in float32."""
        config, params = load_checkpoint(path, remat=remat)
        return cls.from_params(config, params, dtype=dtype, param_dtype=param_dtype)

    def save_pretrained(self, path: str | os.PathLike) -> str:
        """Write ``config.json`` and ``model.safetensors`` (float32) that transformers'
        ``Qwen2VLForConditionalGeneration.from_pretrained`` loads. Returns ``path``."""
        return save_checkpoint(path, self.config, self.params())

    def params(self) -> dict:
        """The parameters as the functional API's nested dict (``nnx.to_pure_dict``)."""
        return param_dict(self)

    # ------------------------------------------------------------------ forward
    def __call__(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None) -> jax.Array:
        """Transformers-style inputs -> logits ``[B, L, V]`` float32 (host preparation + jitted
        forward, as ``qwen2_vl.logits``). Inside a traced function call :meth:`forward`."""
        return logits(self.config, self.params(), input_ids, attention_mask, pixel_values, image_grid_thw)

    def forward(self, inputs: ModelInputs) -> jax.Array:
        """Logits ``[B, L, V]`` for prepared inputs (``qwen2_vl.prepare_batch``); traceable."""
        return forward(self.config, self.params(), inputs)

    def hidden_states(self, inputs: ModelInputs) -> jax.Array:
        """Final-norm hidden states ``[B, L, H]`` in the compute dtype; traceable."""
        return hidden_states(self.config, self.params(), inputs)

    def lm_head_logits(self, hidden) -> jax.Array:
        """``hidden [..., H] -> logits [..., V]`` (tied embeddings or ``lm_head``); traceable."""
        return lm_head(self.config, self.params(), hidden)
