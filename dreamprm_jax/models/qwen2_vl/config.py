"""Qwen2-VL configuration: frozen, hashable dataclasses usable as a ``jax.jit`` static argument.

Three dataclasses mirror transformers' ``Qwen2VLTextConfig``, ``Qwen2VLVisionConfig`` and
``Qwen2VLConfig``; only the fields the forward pass needs are kept, plus two run-time policies
on the top-level config:

* ``dtype``: the *compute* dtype (``"float32"`` or ``"bfloat16"``; ``"float64"`` for
  reference-grade checks under ``jax.enable_x64``). Parameters are stored in their own dtype
  (float32 master weights by default, ``param_dtype`` of the NNX modules) and cast to
  ``dtype`` inside the forward pass. Norm statistics, softmax and rotary angles are computed
  in float32 as in transformers (float64 for float64 compute); logits are float32 (float64).
* ``remat``: the per-block rematerialisation policy name, one of ``REMAT_POLICIES``
  (``"none"`` = no ``jax.checkpoint``; ``"full"`` = recompute everything; the others name
  ``jax.checkpoint_policies`` members).

``Qwen2VLConfig.from_hf_dict`` reads both ``config.json`` layouts:

* the flat hub layout of the released checkpoints (text fields at the top level,
  ``rope_theta`` and ``rope_scaling: {"type": "mrope", "mrope_section": [...]}``,
  ``vision_config`` with ``in_chans``), and
* the nested layout transformers 5 writes (``text_config`` with ``rope_parameters``,
  ``vision_config`` with ``in_channels``, ``tie_word_embeddings`` at the top).

``to_hf_dict`` writes the flat hub layout, which transformers 4.x and 5.x both load.

Presets are code: ``qwen2_vl_2b()`` (the released 2B numbers, *not* transformers' class
defaults, which are the 7B/72B numbers), ``tiny()`` for unit tests and ``demo()`` for the CPU
training demo.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

import jax

DTYPES = ("float32", "bfloat16", "float16", "float64")
REMAT_POLICIES = (
    "none",
    "full",
    "dots_saveable",
    "nothing_saveable",
    "everything_saveable",
    "dots_with_no_batch_dims_saveable",
)
VISION_ACTIVATIONS = ("quick_gelu", "gelu", "gelu_pytorch_tanh", "silu")


def _fail(where: str, message: str) -> None:
    raise ValueError(f"qwen2_vl config: {where}: {message}")


@dataclass(frozen=True)
class TextConfig:
    """The Qwen2 decoder with multimodal rotary embedding (M-RoPE).

    ``mrope_section`` splits the ``head_dim // 2`` rotary frequencies into (temporal, height,
    width) chunks; its sum must equal ``head_dim // 2``.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rope_theta: float = 1_000_000.0
    mrope_section: tuple[int, int, int] = (16, 24, 24)
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 32768
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    bos_token_id: int | None = 151643
    eos_token_id: int | None = 151645

    def __post_init__(self):
        object.__setattr__(self, "mrope_section", tuple(int(s) for s in self.mrope_section))
        if self.hidden_size % self.num_attention_heads:
            _fail("text.hidden_size", f"{self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            _fail("text.num_key_value_heads", f"num_attention_heads={self.num_attention_heads} is not a multiple of {self.num_key_value_heads}")
        if self.head_dim % 2:
            _fail("text.head_dim", f"must be even for rotary embedding, got {self.head_dim}")
        if len(self.mrope_section) != 3 or sum(self.mrope_section) != self.head_dim // 2:
            _fail("text.mrope_section", f"expected 3 ints summing to head_dim // 2 = {self.head_dim // 2}, got {self.mrope_section}")
        if self.hidden_act != "silu":
            _fail("text.hidden_act", f"only 'silu' is supported, got {self.hidden_act!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class VisionConfig:
    """The Qwen2-VL vision tower (ViT with 2D rotary embedding and a 2x2 patch merger).

    ``hidden_size`` is the *output* dimension of the merger (= the text hidden size);
    ``embed_dim`` is the width of the vision blocks.
    """

    depth: int
    embed_dim: int
    num_heads: int
    mlp_ratio: float = 4
    hidden_act: str = "quick_gelu"
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    hidden_size: int = 1536
    rope_theta: float = 10000.0
    initializer_range: float = 0.02

    def __post_init__(self):
        if self.embed_dim % self.num_heads:
            _fail("vision.embed_dim", f"{self.embed_dim} is not divisible by num_heads={self.num_heads}")
        if self.head_dim % 4:
            _fail("vision.head_dim", f"must be a multiple of 4 for the 2D rotary embedding, got {self.head_dim}")
        if self.hidden_act not in VISION_ACTIVATIONS:
            _fail("vision.hidden_act", f"expected one of {VISION_ACTIVATIONS}, got {self.hidden_act!r}")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_dim(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch row of ``pixel_values``: C * Tp * P * P."""
        return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size

    @property
    def merge_dim(self) -> int:
        """Width of the merger MLP: embed_dim * spatial_merge_size ** 2."""
        return self.embed_dim * self.spatial_merge_size**2


@dataclass(frozen=True)
class Qwen2VLConfig:
    """Top-level Qwen2-VL configuration (hashable; pass it as a static argument to ``jax.jit``)."""

    text: TextConfig
    vision: VisionConfig
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    dtype: str = "float32"
    remat: str = "none"

    def __post_init__(self):
        if self.dtype not in DTYPES:
            _fail("dtype", f"expected one of {DTYPES}, got {self.dtype!r}")
        if self.remat not in REMAT_POLICIES:
            _fail("remat", f"expected one of {REMAT_POLICIES}, got {self.remat!r}")
        if self.vision.hidden_size != self.text.hidden_size:
            _fail("vision.hidden_size", f"merger output {self.vision.hidden_size} != text.hidden_size {self.text.hidden_size}")
        for name in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
            value = getattr(self, name)
            if not 0 <= value < self.text.vocab_size:
                _fail(name, f"{value} is outside the vocabulary [0, {self.text.vocab_size})")

    def replace(self, **changes: Any) -> "Qwen2VLConfig":
        """A copy with top-level fields changed, e.g. ``config.replace(dtype="bfloat16")``."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ HF json
    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any], *, dtype: str = "float32", remat: str = "none") -> "Qwen2VLConfig":
        """Read a transformers ``config.json`` dict (flat hub layout or nested v5 layout).

        ``dtype`` / ``remat`` are run-time policies, not part of the file; ``torch_dtype`` in the
        file describes storage only and is ignored.
        """
        d = dict(d)
        model_type = d.get("model_type", "qwen2_vl")
        if model_type != "qwen2_vl":
            _fail("model_type", f"expected 'qwen2_vl', got {model_type!r}")
        nested = isinstance(d.get("text_config"), Mapping)
        t = dict(d["text_config"]) if nested else d

        def text_get(key, default=None):
            if key in t and t[key] is not None:
                return t[key]
            if key in d and d[key] is not None:
                return d[key]
            return default

        rope = t.get("rope_parameters") or t.get("rope_scaling") or d.get("rope_parameters") or d.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "mrope"))
        if rope_type not in ("mrope", "default"):
            _fail("rope_scaling.type", f"expected 'mrope' (or v5's 'default' with mrope_section), got {rope_type!r}")
        if "mrope_section" not in rope:
            _fail("rope_scaling.mrope_section", "missing; Qwen2-VL needs the (t, h, w) rotary split")
        rope_theta = rope.get("rope_theta", text_get("rope_theta", 1_000_000.0))
        tie = d.get("tie_word_embeddings")
        if tie is None or (tie is False and t.get("tie_word_embeddings")):
            tie = bool(t.get("tie_word_embeddings", False))
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        for key in required:
            if text_get(key) is None:
                _fail(f"text_config.{key}" if nested else key, "missing")
        text = TextConfig(
            vocab_size=int(text_get("vocab_size")),
            hidden_size=int(text_get("hidden_size")),
            intermediate_size=int(text_get("intermediate_size")),
            num_hidden_layers=int(text_get("num_hidden_layers")),
            num_attention_heads=int(text_get("num_attention_heads")),
            num_key_value_heads=int(text_get("num_key_value_heads", text_get("num_attention_heads"))),
            rope_theta=float(rope_theta),
            mrope_section=tuple(int(s) for s in rope["mrope_section"]),
            rms_norm_eps=float(text_get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(tie),
            max_position_embeddings=int(text_get("max_position_embeddings", 32768)),
            hidden_act=str(text_get("hidden_act", "silu")),
            initializer_range=float(text_get("initializer_range", 0.02)),
            bos_token_id=text_get("bos_token_id"),
            eos_token_id=_first(text_get("eos_token_id")),
        )
        v = dict(d.get("vision_config") or {})
        vrope = v.get("rope_parameters") or {}
        patch = v.get("patch_size", v.get("spatial_patch_size", 14))
        vision = VisionConfig(
            depth=int(v.get("depth", v.get("num_hidden_layers", 32))),
            embed_dim=int(v.get("embed_dim", 1280)),
            num_heads=int(v.get("num_heads", v.get("num_attention_heads", 16))),
            mlp_ratio=v.get("mlp_ratio", 4),
            hidden_act=str(v.get("hidden_act", "quick_gelu")),
            patch_size=int(_first(patch)),
            temporal_patch_size=int(_first(v.get("temporal_patch_size", 2))),
            spatial_merge_size=int(v.get("spatial_merge_size", 2)),
            in_channels=int(v.get("in_channels", v.get("in_chans", 3))),
            hidden_size=int(v.get("hidden_size", text.hidden_size)),
            rope_theta=float(vrope.get("rope_theta", 10000.0)),
            initializer_range=float(v.get("initializer_range", 0.02)),
        )
        return cls(
            text=text,
            vision=vision,
            image_token_id=int(d.get("image_token_id", 151655)),
            video_token_id=int(d.get("video_token_id", 151656)),
            vision_start_token_id=int(d.get("vision_start_token_id", 151652)),
            vision_end_token_id=int(d.get("vision_end_token_id", 151653)),
            dtype=dtype,
            remat=remat,
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """The flat hub ``config.json`` layout (what Qwen/Qwen2-VL-2B-Instruct ships)."""
        t, v = self.text, self.vision
        out: dict[str, Any] = {
            "architectures": ["Qwen2VLForConditionalGeneration"],
            "model_type": "qwen2_vl",
            "torch_dtype": "float32",
            "vocab_size": t.vocab_size,
            "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads,
            "num_key_value_heads": t.num_key_value_heads,
            "hidden_act": t.hidden_act,
            "max_position_embeddings": t.max_position_embeddings,
            "max_window_layers": t.num_hidden_layers,
            "initializer_range": t.initializer_range,
            "rms_norm_eps": t.rms_norm_eps,
            "rope_theta": t.rope_theta,
            "rope_scaling": {"type": "mrope", "mrope_section": list(t.mrope_section)},
            "attention_dropout": 0.0,
            "use_cache": True,
            "use_sliding_window": False,
            "sliding_window": t.max_position_embeddings,
            "tie_word_embeddings": t.tie_word_embeddings,
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "vision_config": {
                "depth": v.depth,
                "embed_dim": v.embed_dim,
                "mlp_ratio": v.mlp_ratio,
                "num_heads": v.num_heads,
                "hidden_act": v.hidden_act,
                "in_chans": v.in_channels,
                "in_channels": v.in_channels,
                "hidden_size": v.hidden_size,
                "patch_size": v.patch_size,
                "spatial_patch_size": v.patch_size,
                "spatial_merge_size": v.spatial_merge_size,
                "temporal_patch_size": v.temporal_patch_size,
                "initializer_range": v.initializer_range,
            },
        }
        out["bos_token_id"] = t.bos_token_id
        out["eos_token_id"] = t.eos_token_id
        if v.rope_theta != 10000.0:
            out["vision_config"]["rope_parameters"] = {"rope_type": "axial", "rope_theta": v.rope_theta}
        return out


# A config is a pytree with no leaves (its value is static aux data), so it can be passed
# positionally through jax.jit / jax.eval_shape / jax.grad without static_argnums.
jax.tree_util.register_static(Qwen2VLConfig)


def _first(x):
    """HF allows lists for a few scalar fields (eos ids, patch sizes); the first entry is used."""
    if isinstance(x, (list, tuple)):
        return x[0] if x else None
    return x


# ---------------------------------------------------------------------- presets
def qwen2_vl_2b(*, dtype: str = "float32", remat: str = "none") -> Qwen2VLConfig:
    """Qwen/Qwen2-VL-2B-Instruct: 2,208,985,600 parameters (embeddings tied)."""
    return Qwen2VLConfig(
        text=TextConfig(
            vocab_size=151936,
            hidden_size=1536,
            intermediate_size=8960,
            num_hidden_layers=28,
            num_attention_heads=12,
            num_key_value_heads=2,
            rope_theta=1_000_000.0,
            mrope_section=(16, 24, 24),
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
            max_position_embeddings=32768,
        ),
        vision=VisionConfig(
            depth=32,
            embed_dim=1280,
            num_heads=16,
            mlp_ratio=4,
            hidden_act="quick_gelu",
            patch_size=14,
            temporal_patch_size=2,
            spatial_merge_size=2,
            in_channels=3,
            hidden_size=1536,
        ),
        image_token_id=151655,
        video_token_id=151656,
        vision_start_token_id=151652,
        vision_end_token_id=151653,
        dtype=dtype,
        remat=remat,
    )


def _special_ids(vocab_size, image_token_id, video_token_id, vision_start_token_id, vision_end_token_id):
    """Default special ids for small vocabularies: the last ids, in Qwen's relative order."""
    return dict(
        vision_start_token_id=vocab_size - 5 if vision_start_token_id is None else vision_start_token_id,
        vision_end_token_id=vocab_size - 4 if vision_end_token_id is None else vision_end_token_id,
        image_token_id=vocab_size - 2 if image_token_id is None else image_token_id,
        video_token_id=vocab_size - 1 if video_token_id is None else video_token_id,
    )


def tiny(
    *,
    vocab_size: int = 256,
    image_token_id: int | None = None,
    video_token_id: int | None = None,
    vision_start_token_id: int | None = None,
    vision_end_token_id: int | None = None,
    num_key_value_heads: int = 2,
    tie_word_embeddings: bool = True,
    patch_size: int = 4,
    dtype: str = "float32",
    remat: str = "none",
) -> Qwen2VLConfig:
    """A unit-test model: hidden 64, 2 layers, 4 heads / 2 kv heads, vision depth 2, embed 32."""
    return Qwen2VLConfig(
        text=TextConfig(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=num_key_value_heads,
            rope_theta=10000.0,
            mrope_section=(2, 3, 3),
            rms_norm_eps=1e-6,
            tie_word_embeddings=tie_word_embeddings,
            max_position_embeddings=4096,
            bos_token_id=None,
            eos_token_id=None,
        ),
        vision=VisionConfig(
            depth=2,
            embed_dim=32,
            num_heads=2,
            mlp_ratio=4,
            patch_size=patch_size,
            temporal_patch_size=2,
            spatial_merge_size=2,
            in_channels=3,
            hidden_size=64,
        ),
        dtype=dtype,
        remat=remat,
        **_special_ids(vocab_size, image_token_id, video_token_id, vision_start_token_id, vision_end_token_id),
    )


def demo(
    *,
    vocab_size: int = 1024,
    image_token_id: int | None = None,
    video_token_id: int | None = None,
    vision_start_token_id: int | None = None,
    vision_end_token_id: int | None = None,
    hidden_size: int = 128,
    num_hidden_layers: int = 3,
    vision_depth: int = 2,
    patch_size: int = 14,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    dtype: str = "float32",
    remat: str = "none",
) -> Qwen2VLConfig:
    """The CPU training-demo model: small enough for 2 cores, large enough to learn.

    Defaults: hidden 128, 3 layers, 4 heads / 2 kv heads (head_dim 32, mrope (4, 6, 6)),
    vision depth 2, embed 64, 4 heads, the real patch geometry (14 px, temporal 2, merge 2)
    so the processor settings are the released ones. Pass the tokenizer's special ids.
    """
    heads = 4
    half = hidden_size // heads // 2
    t_sec = half // 4
    h_sec = (half - t_sec) // 2
    return Qwen2VLConfig(
        text=TextConfig(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=num_hidden_layers,
            num_attention_heads=heads,
            num_key_value_heads=2,
            rope_theta=10000.0,
            mrope_section=(t_sec, h_sec, half - t_sec - h_sec),
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
            max_position_embeddings=8192,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
        ),
        vision=VisionConfig(
            depth=vision_depth,
            embed_dim=64,
            num_heads=4,
            mlp_ratio=4,
            patch_size=patch_size,
            temporal_patch_size=2,
            spatial_merge_size=2,
            in_channels=3,
            hidden_size=hidden_size,
        ),
        dtype=dtype,
        remat=remat,
        **_special_ids(vocab_size, image_token_id, video_token_id, vision_start_token_id, vision_end_token_id),
    )
