"""PRM forward throughput: JAX (jit) beside transformers' PyTorch, same weights, same inputs.

    python -m benchmarks.forward                       # small config, CPU, both frameworks
    python -m benchmarks.forward --batch 8 --seq-len 256 --repeats 20
    python -m benchmarks.forward --no-torch            # JAX only

What is timed: the DreamPRM reward forward, i.e. Qwen2-VL on (text + one image per row) and
the Linear(vocab -> 1) + sigmoid head on the last token.

* JAX: ``jax.jit(prm.score)`` on a batch from ``qwen2_vl.prepare_batch`` (host preparation
  is done once, outside the timing; only the device call + ``block_until_ready`` is timed),
  after ``--warmup`` calls (the first compiles).
* PyTorch: DreamPRM's ``QwenVL_RM.forward`` (``model(...).logits[:, -1]`` -> ``nn.Linear``; the
  final sigmoid of B scalars is applied outside the timing) under ``torch.inference_mode()``,
  float32, ``--torch-threads`` intra-op threads (torch's default unless given).

Reported: median seconds per call over ``--repeats`` calls, samples/s = B / median and
tokens/s = B * L / median, plus the largest |p_jax - p_torch| as a sanity check. The JSON
(default ``benchmarks/results/forward.json``) records the configuration and the software
versions. torch is imported only here (and in tests), never by the library.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile

import numpy as np


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.forward",
        description="PRM forward throughput, JAX (jit) vs transformers PyTorch, same weights and inputs.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--batch", type=int, default=4, help="sequences per call (B)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (L), image tokens included")
    p.add_argument("--image-side", type=int, default=56, help="image side in pixels (multiple of 28); 0 = text only")
    p.add_argument("--vocab", type=int, default=2048, help="vocabulary size V")
    p.add_argument("--hidden", type=int, default=128, help="text hidden size H")
    p.add_argument("--layers", type=int, default=2, help="decoder layers")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument("--kv-heads", type=int, default=2, help="key/value heads")
    p.add_argument("--vision-depth", type=int, default=2, help="vision blocks")
    p.add_argument("--vision-embed", type=int, default=64, help="vision embed dim")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls before timing (the first compiles)")
    p.add_argument("--repeats", type=int, default=10, help="timed calls; the median is reported")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-torch", action="store_true", help="time JAX only")
    p.add_argument("--torch-threads", type=int, default=0,
                   help="torch.set_num_threads for the PyTorch run; 0 keeps torch's default (on a busy shared "
                        "machine, 1 avoids spin-wait contention)")
    p.add_argument("--out", default=os.path.join("benchmarks", "results", "forward.json"), help="JSON output path")
    return p


def _hf_config(a):
    from transformers import Qwen2VLConfig

    half = a.hidden // a.heads // 2
    t = half // 4
    h = (half - t) // 2
    section = [t, h, half - t - h]
    return Qwen2VLConfig(
        text_config=dict(
            vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=4 * a.hidden, num_hidden_layers=a.layers,
            num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "mrope_section": section, "rope_theta": 10000.0},
            rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=1,
        ),
        vision_config=dict(
            depth=a.vision_depth, embed_dim=a.vision_embed, hidden_size=a.hidden, num_heads=4, mlp_ratio=4,
            patch_size=14, temporal_patch_size=2, spatial_merge_size=2,
        ),
        image_token_id=a.vocab - 2, video_token_id=a.vocab - 1,
        vision_start_token_id=a.vocab - 5, vision_end_token_id=a.vocab - 4,
    )


def _inputs(a, rng):
    """Random ids; each row ``<vs> <img>*n <ve> text...`` filling exactly L tokens."""
    B, L = a.batch, a.seq_len
    ids = rng.integers(2, a.vocab - 8, size=(B, L))
    pix = grid = None
    if a.image_side:
        g = a.image_side // 14
        n_img = g * g // 4
        if n_img + 3 > L:
            raise SystemExit(f"--seq-len {L} is too short for {n_img} image tokens + 3")
        ids[:, 0] = a.vocab - 5
        ids[:, 1 : 1 + n_img] = a.vocab - 2
        ids[:, 1 + n_img] = a.vocab - 4
        pix = rng.standard_normal((B * g * g, 3 * 2 * 14 * 14)).astype(np.float32)
        grid = np.tile(np.array([[1, g, g]], np.int64), (B, 1))
    return ids.astype(np.int64), np.ones((B, L), np.int64), pix, grid


def main(argv=None) -> dict:
    a = _parser().parse_args(argv)
    rng = np.random.default_rng(a.seed)
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    torch.manual_seed(a.seed)
    hf = Qwen2VLForConditionalGeneration(_hf_config(a)).eval()
    head = torch.nn.Linear(a.vocab, 1)
    ids, mask, pix, grid = _inputs(a, rng)

    import jax

    from benchmarks import _common
    from dreamprm_jax.models import prm, qwen2_vl

    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        config, backbone = qwen2_vl.load_checkpoint(d)
    params = {
        "backbone": jax.device_put(backbone),
        "head": {"kernel": jax.numpy.asarray(head.weight.detach().numpy().T.copy()),
                 "bias": jax.numpy.asarray(head.bias.detach().numpy().copy())},
    }
    batch = jax.device_put(qwen2_vl.prepare_batch(config, ids, mask, pix, grid))
    score = jax.jit(prm.score, static_argnums=0)
    p_jax, z_jax = (np.asarray(x) for x in score(config, params, batch))
    timing = _common.time_calls(lambda: jax.block_until_ready(score(config, params, batch)), a.warmup, a.repeats)
    t_jax, times_jax = timing["median_s"], timing["times_s"]

    B, L = ids.shape
    result = {
        "benchmark": "prm_forward",
        "config": {k: v for k, v in vars(a).items() if k != "out"},
        "image_tokens_per_row": int((ids[0] == a.vocab - 2).sum()),
        "jax": {"median_s": t_jax, "samples_per_s": B / t_jax, "tokens_per_s": B * L / t_jax, "times_s": times_jax,
                "backend": jax.default_backend(), "device": str(jax.devices()[0])},
        "versions": {"jax": jax.__version__, "python": platform.python_version(), "machine": platform.machine(),
                     "cpu_count": os.cpu_count()},
    }
    if not a.no_torch:
        kw = dict(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
        if pix is not None:
            mm = np.where(ids == config.image_token_id, 1, 0)
            kw.update(pixel_values=torch.from_numpy(pix), image_grid_thw=torch.from_numpy(grid),
                      mm_token_type_ids=torch.from_numpy(mm))

        if a.torch_threads:
            torch.set_num_threads(a.torch_threads)

        def torch_forward():
            with torch.inference_mode():
                logits = hf(**kw).logits[:, -1, :].float()  # DreamPRM: last position
                return head(logits)[:, 0]  # the reward logit; sigmoid below

        z_torch = torch_forward().numpy()
        p_torch = 1.0 / (1.0 + np.exp(-z_torch))
        timing = _common.time_calls(torch_forward, a.warmup, a.repeats)
        t_torch, times_torch = timing["median_s"], timing["times_s"]
        import transformers

        result["torch"] = {"median_s": t_torch, "samples_per_s": B / t_torch, "tokens_per_s": B * L / t_torch,
                           "times_s": times_torch, "threads": torch.get_num_threads()}
        result["versions"].update(torch=torch.__version__, transformers=transformers.__version__)
        result["max_abs_prob_diff"] = float(np.max(np.abs(p_jax - p_torch)))
        result["max_abs_logit_diff"] = float(np.max(np.abs(z_jax - z_torch)))
        result["jax_speedup"] = t_torch / t_jax

    print(f"PRM forward  B={B} L={L} V={a.vocab} H={a.hidden} layers={a.layers} "
          f"image={a.image_side}px  ({result['jax']['device']})")
    print(f"{'framework':<10} {'median ms':>10} {'samples/s':>10} {'tokens/s':>10}")
    for name in ("jax", "torch"):
        if name in result:
            r = result[name]
            print(f"{name:<10} {1e3 * r['median_s']:>10.2f} {r['samples_per_s']:>10.1f} {r['tokens_per_s']:>10.0f}")
    if "max_abs_prob_diff" in result:
        print(f"max |p_jax - p_torch| = {result['max_abs_prob_diff']:.2e}, max |z_jax - z_torch| = "
              f"{result['max_abs_logit_diff']:.2e}; JAX speed-up x{result['jax_speedup']:.2f} "
              f"(torch threads {result['torch']['threads']})")
    _common.write_json(a.out, result)
    print(f"wrote {a.out}")
    return result


if __name__ == "__main__":
    main()
