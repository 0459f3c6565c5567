"""Hub tensor names <-> the stacked JAX parameter tree, one tensor at a time.

The parameter tree (the attribute paths of the NNX modules) stores every per-block /
per-layer leaf stacked on a leading axis, kernels as ``[in, out]``. The hub checkpoint stores one PyTorch tensor per block and
layer, ``nn.Linear`` weights as ``[out, in]`` and the patch embedding as a Conv3d weight
``[E, C, Tp, P, P]``. The rewrites are:

* ``nn.Linear.weight`` ``[out, in]``  ->  ``kernel = weight.T``  ``[in, out]``
* Conv3d ``[E, C, Tp, P, P]``           ->  ``kernel = weight.reshape(E, C*Tp*P*P).T``
  (exact: the processor flattens each patch in (C, Tp, P, P) order, so the stride-equals-kernel
  convolution is this matmul)
* norms' ``weight``                     ->  ``scale``; embeddings' ``weight`` -> ``embedding``
* ``visual.blocks.{i}.X`` / ``model.layers.{i}.X`` -> row ``i`` of the stacked leaf ``X``

``params_from_hf`` preallocates the stacked float32 arrays once and copies every incoming
tensor into place, so peak memory is about one model copy plus one tensor.
"""

from __future__ import annotations

import re
from typing import Iterable, Iterator

import numpy as np

from .config import Qwen2VLConfig

# (tree path, hub name (with {i} for stacked), stack group or None, kind)
#   kind: "linear" = transpose, "conv" = Conv3d patch embedding, "same" = copy
_VISUAL_BLOCK = (
    (("norm1", "scale"), "norm1.weight", "same"),
    (("norm1", "bias"), "norm1.bias", "same"),
    (("norm2", "scale"), "norm2.weight", "same"),
    (("norm2", "bias"), "norm2.bias", "same"),
    (("attn", "qkv", "kernel"), "attn.qkv.weight", "linear"),
    (("attn", "qkv", "bias"), "attn.qkv.bias", "same"),
    (("attn", "proj", "kernel"), "attn.proj.weight", "linear"),
    (("attn", "proj", "bias"), "attn.proj.bias", "same"),
    (("mlp", "fc1", "kernel"), "mlp.fc1.weight", "linear"),
    (("mlp", "fc1", "bias"), "mlp.fc1.bias", "same"),
    (("mlp", "fc2", "kernel"), "mlp.fc2.weight", "linear"),
    (("mlp", "fc2", "bias"), "mlp.fc2.bias", "same"),
)
_TEXT_LAYER = (
    (("input_layernorm", "scale"), "input_layernorm.weight", "same"),
    (("post_attention_layernorm", "scale"), "post_attention_layernorm.weight", "same"),
    (("self_attn", "q_proj", "kernel"), "self_attn.q_proj.weight", "linear"),
    (("self_attn", "q_proj", "bias"), "self_attn.q_proj.bias", "same"),
    (("self_attn", "k_proj", "kernel"), "self_attn.k_proj.weight", "linear"),
    (("self_attn", "k_proj", "bias"), "self_attn.k_proj.bias", "same"),
    (("self_attn", "v_proj", "kernel"), "self_attn.v_proj.weight", "linear"),
    (("self_attn", "v_proj", "bias"), "self_attn.v_proj.bias", "same"),
    (("self_attn", "o_proj", "kernel"), "self_attn.o_proj.weight", "linear"),
    (("mlp", "gate_proj", "kernel"), "mlp.gate_proj.weight", "linear"),
    (("mlp", "up_proj", "kernel"), "mlp.up_proj.weight", "linear"),
    (("mlp", "down_proj", "kernel"), "mlp.down_proj.weight", "linear"),
)


def param_shapes(config: Qwen2VLConfig) -> dict:
    """The parameter tree with shape tuples as leaves (stacked axes included)."""
    t, v = config.text, config.vision
    E, M, D, Q = v.embed_dim, v.mlp_dim, v.depth, v.merge_dim
    H, I, L = t.hidden_size, t.intermediate_size, t.num_hidden_layers
    kv = t.num_key_value_heads * t.head_dim
    shapes = {
        "visual": {
            "patch_embed": {"kernel": (v.patch_dim, E)},
            "blocks": {
                "norm1": {"scale": (D, E), "bias": (D, E)},
                "norm2": {"scale": (D, E), "bias": (D, E)},
                "attn": {
                    "qkv": {"kernel": (D, E, 3 * E), "bias": (D, 3 * E)},
                    "proj": {"kernel": (D, E, E), "bias": (D, E)},
                },
                "mlp": {
                    "fc1": {"kernel": (D, E, M), "bias": (D, M)},
                    "fc2": {"kernel": (D, M, E), "bias": (D, E)},
                },
            },
            "merger": {
                "ln_q": {"scale": (E,), "bias": (E,)},
                "mlp_0": {"kernel": (Q, Q), "bias": (Q,)},
                "mlp_2": {"kernel": (Q, v.hidden_size), "bias": (v.hidden_size,)},
            },
        },
        "language_model": {
            "embed_tokens": {"embedding": (t.vocab_size, H)},
            "layers": {
                "input_layernorm": {"scale": (L, H)},
                "post_attention_layernorm": {"scale": (L, H)},
                "self_attn": {
                    "q_proj": {"kernel": (L, H, H), "bias": (L, H)},
                    "k_proj": {"kernel": (L, H, kv), "bias": (L, kv)},
                    "v_proj": {"kernel": (L, H, kv), "bias": (L, kv)},
                    "o_proj": {"kernel": (L, H, H)},
                },
                "mlp": {
                    "gate_proj": {"kernel": (L, H, I)},
                    "up_proj": {"kernel": (L, H, I)},
                    "down_proj": {"kernel": (L, I, H)},
                },
            },
            "norm": {"scale": (H,)},
        },
    }
    if not t.tie_word_embeddings:
        shapes["lm_head"] = {"kernel": (H, t.vocab_size)}
    return shapes


def _specs(config: Qwen2VLConfig) -> list[tuple[tuple[str, ...], str, str | None, str]]:
    """Every tensor as (tree path, hub name or template, stack group, kind)."""
    specs = [
        (("visual", "patch_embed", "kernel"), "visual.patch_embed.proj.weight", None, "conv"),
        (("visual", "merger", "ln_q", "scale"), "visual.merger.ln_q.weight", None, "same"),
        (("visual", "merger", "ln_q", "bias"), "visual.merger.ln_q.bias", None, "same"),
        (("visual", "merger", "mlp_0", "kernel"), "visual.merger.mlp.0.weight", None, "linear"),
        (("visual", "merger", "mlp_0", "bias"), "visual.merger.mlp.0.bias", None, "same"),
        (("visual", "merger", "mlp_2", "kernel"), "visual.merger.mlp.2.weight", None, "linear"),
        (("visual", "merger", "mlp_2", "bias"), "visual.merger.mlp.2.bias", None, "same"),
        (("language_model", "embed_tokens", "embedding"), "model.embed_tokens.weight", None, "same"),
        (("language_model", "norm", "scale"), "model.norm.weight", None, "same"),
    ]
    specs += [(("visual", "blocks") + p, "visual.blocks.{i}." + n, "visual", k) for p, n, k in _VISUAL_BLOCK]
    specs += [(("language_model", "layers") + p, "model.layers.{i}." + n, "text", k) for p, n, k in _TEXT_LAYER]
    if not config.text.tie_word_embeddings:
        specs.append((("lm_head", "kernel"), "lm_head.weight", None, "linear"))
    return specs


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree, path, value):
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _hf_shape(kind: str, tree_shape: tuple[int, ...], config: Qwen2VLConfig) -> tuple[int, ...]:
    """The hub tensor shape of one (unstacked) leaf."""
    if kind == "linear":
        return tuple(reversed(tree_shape))
    if kind == "conv":
        v = config.vision
        return (v.embed_dim, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    return tuple(tree_shape)


def _to_tree(kind: str, array: np.ndarray) -> np.ndarray:
    if kind == "linear":
        return array.T
    if kind == "conv":
        return array.reshape(array.shape[0], -1).T
    return array


_V5_PREFIXES = (
    ("model.language_model.", "model."),
    ("model.visual.", "visual."),
)


def normalize_hf_name(name: str) -> str:
    """Map a transformers-5 in-memory name to the hub name; hub names come back unchanged.

    ``model.language_model.X`` -> ``model.X``; ``model.visual.X`` -> ``visual.X``;
    ``lm_head.weight`` and hub names are left as they are.
    """
    for old, new in _V5_PREFIXES:
        if name.startswith(old):
            return new + name[len(old):]
    return name


_STACKED = re.compile(r"^(visual\.blocks|model\.layers)\.(\d+)\.(.+)$")


def params_from_hf(config: Qwen2VLConfig, named_tensors: Iterable[tuple[str, np.ndarray]]) -> dict:
    """Build the float32 parameter tree (numpy leaves) from (name, tensor) pairs.

    Names may be hub names or transformers-5 names (see ``normalize_hf_name``). With tied
    embeddings an ``lm_head.weight`` entry is accepted and ignored. Buffers named
    ``*.rotary_emb.inv_freq`` are ignored.

    Raises:
      ValueError naming the tensor, on an unexpected name, a duplicate, a shape that differs
      from the one ``config`` implies (expected and found shapes are given), or when tensors
      are missing after the iterable is exhausted.
    """
    shapes = param_shapes(config)
    depth = {"visual": config.vision.depth, "text": config.text.num_hidden_layers}
    flat: dict[str, tuple] = {}  # hub name (template for stacked) -> spec
    params: dict = {}
    filled: dict[tuple[str, ...], np.ndarray] = {}
    for path, name, group, kind in _specs(config):
        shape = _get(shapes, path)
        _set(params, path, np.empty(shape, dtype=np.float32))
        filled[path] = np.zeros(depth[group] if group else 1, dtype=bool)
        flat[name] = (path, group, kind, shape[1:] if group else shape)

    for raw_name, tensor in named_tensors:
        name = normalize_hf_name(raw_name)
        if name.endswith("rotary_emb.inv_freq"):
            continue
        index = 0
        key = name
        match = _STACKED.match(name)
        if match:
            key = f"{match.group(1)}.{{i}}.{match.group(3)}"
            index = int(match.group(2))
        if key not in flat:
            if name == "lm_head.weight" and config.text.tie_word_embeddings:
                continue
            raise ValueError(
                f"params_from_hf: unexpected tensor {raw_name!r} (hub name {name!r}); "
                f"it has no place in a Qwen2-VL tree for this config"
            )
        path, group, kind, leaf_shape = flat[key]
        if group and index >= depth[group]:
            raise ValueError(
                f"params_from_hf: unexpected tensor {raw_name!r}: index {index} >= "
                f"{'vision depth' if group == 'visual' else 'num_hidden_layers'} {depth[group]}"
            )
        array = np.asarray(tensor)
        expected = _hf_shape(kind, leaf_shape, config)
        if tuple(array.shape) != expected:
            raise ValueError(
                f"params_from_hf: tensor {raw_name!r} has shape {tuple(array.shape)}, expected {expected}"
            )
        if filled[path][index]:
            raise ValueError(f"params_from_hf: tensor {raw_name!r} appears twice")
        target = _get(params, path)
        if group:
            target[index] = _to_tree(kind, array)
        else:
            target[...] = _to_tree(kind, array)
        filled[path][index] = True

    missing = []
    for name, (path, group, kind, leaf_shape) in flat.items():
        for index in np.flatnonzero(~filled[path]):
            hub = name.replace("{i}", str(index)) if group else name
            missing.append(f"{hub} {_hf_shape(kind, leaf_shape, config)}")
    if missing:
        shown = ", ".join(missing[:8]) + (f", ... ({len(missing)} in all)" if len(missing) > 8 else "")
        raise ValueError(f"params_from_hf: missing tensors (name, expected shape): {shown}")
    return params


def hf_from_params(config: Qwen2VLConfig, params) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (hub name, float32 numpy tensor in PyTorch layout), one tensor at a time.

    With tied embeddings no ``lm_head.weight`` is written (as in the released checkpoints).
    Raises ValueError naming the leaf if a leaf's shape does not match ``config``.
    """
    shapes = param_shapes(config)
    v = config.vision
    for path, name, group, kind in _specs(config):
        leaf = _get(params, path)
        expected = _get(shapes, path)
        if tuple(leaf.shape) != tuple(expected):
            raise ValueError(
                f"hf_from_params: params[{'/'.join(path)}] has shape {tuple(leaf.shape)}, expected {tuple(expected)}"
            )
        rows = range(expected[0]) if group else [None]
        for index in rows:
            array = np.asarray(leaf[index] if group else leaf, dtype=np.float32)
            if kind == "linear":
                array = array.T
            elif kind == "conv":
                array = array.T.reshape(v.embed_dim, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
            hub = name.replace("{i}", str(index)) if group else name
            yield hub, np.ascontiguousarray(array)
