"""Model code of another git revision vs the working tree, timed side by side in one process.

    python -m benchmarks.ab_model --rev 852308e                       # exact / darts / none bi-level steps
    python -m benchmarks.ab_model --rev 852308e --target grad --batch 16 --seq-len 112
    python -m benchmarks.ab_model --rev 852308e --torch-threads 1     # + the PyTorch DARTS reference

On a shared machine run-to-run noise swamps model-code changes, so this compiles both versions
in one process and interleaves their repetitions (old, new, [torch], old, new, ...), reporting
median / min / max. The old version is ``dreamprm_jax/models/qwen2_vl/{text,vision}.py`` read
from ``git show REV:path`` and loaded as private modules; ``model.decoder`` and
``model.encode_images`` are pointed at them while the old programs are traced (everything
else, prm / engine / trainer, is the working tree's), so REV's decoder and image encoder must
take the working tree's arguments; to time a whole revision beside the working tree (its own
model, engine and trainer, e.g. across a change of the model's layout), use
``python -m benchmarks.step_throughput --baseline-rev REV``. Problem: ``benchmarks._common``'s
generated DreamPRM batches (left-padded rows, one image each).

Targets: ``step`` (``train.step.make_bilevel_step`` per ``--methods``, ``none`` = no
reweighting), ``grad`` / ``forward`` (``jax.grad`` of / the inner loss on one batch).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ab_model", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--rev", required=True, help="git revision of the old model code")
    p.add_argument("--target", choices=("step", "grad", "forward"), default="step")
    p.add_argument("--methods", nargs="+", default=["exact", "darts", "none"], help="--target step")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--image-side", type=int, default=56)
    p.add_argument("--unroll", type=int, default=5)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--torch-threads", type=int, nargs="*", default=[],
                   help="--target step: also time the PyTorch DARTS reference with these thread counts")
    return p


def _load_old(rev: str):
    """``(text, vision)`` modules of ``rev``, loaded inside the package so relative imports work."""
    root = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=True).stdout.strip()
    tmp = tempfile.mkdtemp(prefix="ab_model_")
    mods = {}
    for name in ("text", "vision"):
        src = subprocess.run(["git", "show", f"{rev}:dreamprm_jax/models/qwen2_vl/{name}.py"], cwd=root,
                             capture_output=True, text=True, check=True).stdout
        path = os.path.join(tmp, f"{name}.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(src)
        spec = importlib.util.spec_from_file_location(f"dreamprm_jax.models.qwen2_vl._ab_old_{name}", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
        mods[name] = mod
    text, vision = mods["text"], mods["vision"]
    for attr in ("dense", "scan_blocks", "apply_rotary", "layer_norm", "compute_dtype"):  # the old vision's text
        if hasattr(text, attr):
            setattr(vision, attr, getattr(text, attr))
    return text, vision


def main(argv=None) -> int:
    a = _parser().parse_args(argv)
    import jax
    import jax.numpy as jnp

    from benchmarks import _common
    from dreamprm_jax.models import prm, qwen2_vl
    from dreamprm_jax.models.qwen2_vl import model, text, vision
    from dreamprm_jax.train import step as step_lib

    old_text, old_vision = _load_old(a.rev)
    config = qwen2_vl.demo(hidden_size=a.hidden, num_hidden_layers=a.layers)
    spec = _common.ProblemSpec(batch=a.batch, seq_len=a.seq_len, unroll=a.unroll if a.target == "step" else 1,
                               image_side=a.image_side)
    problem = _common.make_problem(config, spec)
    params = prm.init(config, jax.random.key(0))
    raw = jnp.zeros((spec.num_domains,), jnp.float32)
    inner_loss, _ = step_lib.make_losses(config, "mean")
    if a.target == "step":
        opt = step_lib.inner_optimizer(2e-3, 5000, 0.5, 0.01)
        meta_opt = step_lib.meta_optimizer(0.01, 1e-3)
        args = (step_lib.init_state(params, spec.num_domains, opt, meta_opt),
                jax.tree.map(jnp.asarray, problem["inner_jax"]), jax.tree.map(jnp.asarray, problem["meta_jax"]))
    else:
        args = (params, jax.tree.map(lambda x: jnp.asarray(x[0]), problem["inner_jax"]))

    def programs():
        if a.target != "step":
            loss = lambda p, b: inner_loss(p, raw, b)  # noqa: E731
            yield a.target, jax.jit(jax.grad(loss) if a.target == "grad" else loss)
            return
        for method in a.methods:
            step = step_lib.make_bilevel_step(config, opt, meta_opt, method="exact" if method == "none" else method,
                                              reweighting=method != "none",
                                              method_options={"R": 0.01} if method in ("darts", "sama") else {})
            yield method, jax.jit(lambda s, i, m, step=step: step(s, i, m)[1])  # metrics; state not threaded

    calls = {}
    for version, (dec, enc) in (("old", (old_text.decoder, old_vision.encode_images)),
                                ("new", (text.decoder, vision.encode_images))):
        model.decoder, model.encode_images = dec, enc
        try:
            for name, fn in programs():
                compiled = fn.lower(*args).compile()
                calls[f"jax {name} {version}"] = lambda c=compiled: jax.block_until_ready(c(*args))
        finally:
            model.decoder, model.encode_images = text.decoder, vision.encode_images
    if a.target == "step" and a.torch_threads:
        import torch

        from benchmarks.reference_torch import TorchReference

        host = jax.device_get(params)
        for th in a.torch_threads:
            ref = TorchReference(config, host, spec.num_domains, inner_lr=2e-3, R=0.01, threads=th)
            ti, tm = [ref.inputs(b) for b in problem["inner_hf"]], ref.inputs(problem["meta_hf"])
            calls[f"torch darts t={th}"] = (lambda ref=ref, ti=ti, tm=tm, th=th:
                                            (torch.set_num_threads(th), ref.iteration(ti, tm)))
    timings = _common.time_interleaved(calls, 1, a.repeats)
    print(f"[ab_model] old = {a.rev}, new = working tree; target {a.target}, B={a.batch} L={a.seq_len} "
          f"image {a.image_side}px, {a.repeats} interleaved repeats on {jax.devices()[0]}")
    for k, t in timings.items():
        print(f"{k:<22} median {1e3 * t['median_s']:9.1f} ms   min {1e3 * t['min_s']:9.1f}   max {1e3 * t['max_s']:9.1f}")
    if hasattr(os, "getloadavg"):
        print("load average (1/5/15 min): " + " / ".join(f"{x:.1f}" for x in os.getloadavg()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
