"""A faithful PyTorch reference of one DreamPRM bi-level iteration (transformers + Betty's DARTS).

    python -m benchmarks.reference_torch            # one iteration on the demo-size model, printed

What the original code runs (DreamPRM on Betty), here without Betty's engine but with its
arithmetic, in float32 (the original stores bfloat16; float32 makes the comparison with
the JAX engine a check of equality rather than of rounding):

* PRM: ``transformers.Qwen2VLForConditionalGeneration`` -> ``logits[:, -1, :]`` (the whole
  ``[B, L, V]`` logits are formed, as in the original) -> ``nn.Linear(V, 1)`` -> sigmoid.
  Batches are left-padded, so position ``-1`` is every row's last real token.
* Domain table: raw ``r [K]`` (init 0), ``w = softplus(r) / mean(softplus(r))``.
* Lower level, ``T`` times: ``L_in = sum_i m_i w[d_i] (p_i - y_i)^2 / sum_i m_i`` ->
  ``torch.autograd.grad`` over the PRM parameters -> ``torch.optim.AdamW`` (weight decay as
  the JAX inner optimizer, default torch's 1e-2) -> ``StepLR.step()``.
* Upper level (Betty ``betty/hypergradient/darts.py``): at the final lower parameters
  ``phi_T``, ``v = dL_meta/dphi``; ``eps = R / (||v|| + 1e-12)`` (Betty's ``darts_alpha`` R,
  default 0.01); ``phi += eps v``, ``grad_p = dL_in/dr`` on the LAST lower batch;
  ``phi -= 2 eps v``, ``grad_n``; the hypergradient is ``(grad_n - grad_p) / (2 eps)`` (no
  direct term: ``L_meta`` does not use ``r``). Then ``torch.optim.AdamW`` on ``r`` (lr 0.01,
  weight decay 1e-3).
* Betty's "reverse weight change" is ``p.data.add(v.data, alpha=eps)`` -- out of place, its
  result discarded (leopard-ai/betty ``betty/hypergradient/darts.py``, both versions read) --
  so the lower parameters are left at ``phi_T - eps v`` and the next lower steps start
  there. ``restore=False`` (default) reproduces that; ``restore=True`` puts ``phi_T`` back
  (what ``dreamprm_jax.bilevel.darts`` does: its aux ``params`` are ``phi_T``). Within one
  iteration (what the parity test checks) both give the same losses and hypergradient.
* ``L_meta``: per chain, ``A = mean_s z_s`` over the step prefixes' reward logits (``sum``
  optional), ``(sigmoid(A) - label)^2``, masked mean over chains.

This matches ``dreamprm_jax.bilevel.darts`` with ``R``, ``lr_eff = 1``, ``point="final"``;
the one deliberate arithmetic difference is AdamW's ``eps_root``: the JAX inner optimizer
divides by ``sqrt(v_hat + 1e-16) + eps`` (finite derivatives at ``v = 0``), torch by
``sqrt(v_hat) + eps`` -- invisible unless a gradient entry is below ~1e-8.

torch is imported only here and in tests, never by the library.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch

__all__ = ["TorchReference", "hf_model_from_params", "torch_inputs"]


def hf_model_from_params(config, backbone, *, dtype=torch.float32):
    """JAX backbone params -> ``Qwen2VLForConditionalGeneration`` via ``save_checkpoint`` +
    ``from_pretrained`` (the project's own export path), in eval mode (no dropout anyway)."""
    from transformers import Qwen2VLForConditionalGeneration

    from dreamprm_jax.models import qwen2_vl

    with tempfile.TemporaryDirectory() as d:
        qwen2_vl.save_checkpoint(d, config, backbone)
        model = Qwen2VLForConditionalGeneration.from_pretrained(d, dtype=dtype)
    return model.eval()


def torch_inputs(hf: dict, image_token_id: int, video_token_id: int) -> dict:
    """numpy HF-style batch -> torch tensors (``mm_token_type_ids`` added with images:
    transformers 5 needs each token's modality for M-RoPE: 1 image, 2 video, 0 text)."""
    ids = hf["input_ids"]
    kw = {"input_ids": torch.from_numpy(np.asarray(ids, np.int64)),
          "attention_mask": torch.from_numpy(np.asarray(hf["attention_mask"], np.int64))}
    if "pixel_values" in hf:
        mm = np.where(ids == image_token_id, 1, np.where(ids == video_token_id, 2, 0)).astype(np.int64)
        kw.update(pixel_values=torch.from_numpy(np.asarray(hf["pixel_values"], np.float32)),
                  image_grid_thw=torch.from_numpy(np.asarray(hf["image_grid_thw"], np.int64)),
                  mm_token_type_ids=torch.from_numpy(mm))
    out = {"model": kw}
    for k in ("labels", "domain_ids", "sample_mask", "step_mask", "chain_mask"):
        if k in hf:
            out[k] = torch.from_numpy(np.asarray(hf[k]))
    if "domain_ids" in out:
        out["domain_ids"] = out["domain_ids"].long()
    return out


class TorchReference:
    """DreamPRM's PRM, domain table and optimizers in PyTorch, one iteration at a time.

    Args:
      config: the JAX ``Qwen2VLConfig`` (for the special ids).
      params: JAX PRM params ``{"backbone", "head"}`` (copied; the JAX arrays are untouched).
      num_domains: K.
      inner_lr, inner_weight_decay, inner_lr_step_size, inner_lr_gamma: lower AdamW + StepLR.
      meta_lr, meta_weight_decay: upper AdamW on r.
      R: Betty's ``darts_alpha``.
      restore: put ``phi_T`` back after the finite difference (Betty does not: see above).
      aggregation: ``"mean"`` (reference code) or ``"sum"`` (paper).
      threads: ``torch.set_num_threads`` (None: leave as is).
    """

    def __init__(self, config, params, num_domains: int, *, inner_lr=2e-3, inner_weight_decay=1e-2,
                 inner_lr_step_size=5000, inner_lr_gamma=0.5, meta_lr=1e-2, meta_weight_decay=1e-3, R=0.01,
                 aggregation="mean", threads: int | None = None, restore: bool = False):
        if threads:
            torch.set_num_threads(int(threads))
        self.config = config
        self.model = hf_model_from_params(config, params["backbone"])
        V = config.text.vocab_size
        self.head = torch.nn.Linear(V, 1)
        with torch.no_grad():
            self.head.weight.copy_(torch.from_numpy(np.asarray(params["head"]["kernel"], np.float32).T.copy()))
            self.head.bias.copy_(torch.from_numpy(np.asarray(params["head"]["bias"], np.float32).copy()))
        self.raw = torch.zeros(num_domains, requires_grad=True)  # the domain table's raw weights
        self.params = [p for p in list(self.model.parameters()) + list(self.head.parameters()) if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=inner_lr, weight_decay=inner_weight_decay)
        self.sched = torch.optim.lr_scheduler.StepLR(self.opt, step_size=inner_lr_step_size, gamma=inner_lr_gamma)
        self.meta_opt = torch.optim.AdamW([self.raw], lr=meta_lr, weight_decay=meta_weight_decay)
        self.R = R
        self.aggregation = aggregation
        self.restore = restore

    # -------------------------------------------------------------------- the model
    def inputs(self, hf: dict) -> dict:
        return torch_inputs(hf, self.config.image_token_id, self.config.video_token_id)

    def reward_logits(self, batch) -> torch.Tensor:
        """DreamPRM's ``QwenVL_RM.forward`` before the sigmoid: ``LN(model(...).logits[:, -1, :])`` [B]."""
        logits = self.model(**batch["model"]).logits[:, -1, :].float()  # [B, V]
        return self.head(logits)[:, 0]  # [B]

    def domain_weights(self, raw=None) -> torch.Tensor:
        sp = torch.nn.functional.softplus(self.raw if raw is None else raw)  # [K]
        return sp / sp.mean()

    def inner_loss(self, batch, raw=None) -> torch.Tensor:
        p = torch.sigmoid(self.reward_logits(batch))  # [B]
        w = self.domain_weights(raw)[batch["domain_ids"]]  # [B]
        m = batch["sample_mask"].float()
        return (m * w * (p - batch["labels"].float()) ** 2).sum() / m.sum().clamp_min(1e-30)

    def outer_loss(self, batch) -> torch.Tensor:
        z = self.reward_logits(batch)  # [M * S]
        sm = batch["step_mask"].float()  # [M, S]
        z = z.reshape(sm.shape) * sm
        a = z.sum(-1) if self.aggregation == "sum" else z.sum(-1) / sm.sum(-1).clamp_min(1e-30)  # [M]
        cm = batch["chain_mask"].float()
        return (cm * (torch.sigmoid(a) - batch["labels"].float()) ** 2).sum() / cm.sum().clamp_min(1e-30)

    # -------------------------------------------------------------------- one iteration
    def inner_step(self, batch) -> float:
        """One lower step (Betty: loss -> grads over the lower parameters -> optimizer -> scheduler)."""
        loss = self.inner_loss(batch, self.raw.detach())
        grads = torch.autograd.grad(loss, self.params)
        for p, g in zip(self.params, grads):
            p.grad = g
        self.opt.step()
        self.sched.step()
        return float(loss.detach())

    def darts_hypergradient(self, last_batch, meta_batch) -> tuple[torch.Tensor, dict]:
        """Betty's DARTS at the current lower parameters, on ``last_batch``; returns (g [K], info)."""
        meta_loss = self.outer_loss(meta_batch)
        v = torch.autograd.grad(meta_loss, self.params)
        v_norm = torch.cat([x.reshape(-1) for x in v]).norm()
        eps = self.R / (v_norm.item() + 1e-12)
        with torch.no_grad():
            for p, d in zip(self.params, v):
                p.add_(d, alpha=eps)
        (grad_p,) = torch.autograd.grad(self.inner_loss(last_batch, self.raw), [self.raw])
        with torch.no_grad():
            for p, d in zip(self.params, v):
                p.add_(d, alpha=-2 * eps)
        (grad_n,) = torch.autograd.grad(self.inner_loss(last_batch, self.raw), [self.raw])
        if self.restore:  # Betty's `p.data.add(v, alpha=eps)` is out of place: phi stays at phi_T - eps v
            with torch.no_grad():
                for p, d in zip(self.params, v):
                    p.add_(d, alpha=eps)
        g = (grad_n - grad_p) / (2 * eps)
        return g, {"meta_loss": float(meta_loss.detach()), "epsilon": eps, "v_norm": float(v_norm)}

    def iteration(self, inner_batches: list, meta_batch) -> dict:
        """T lower steps, DARTS hypergradient, one meta AdamW step on r (batches from :meth:`inputs`)."""
        losses = [self.inner_step(b) for b in inner_batches]
        g, info = self.darts_hypergradient(inner_batches[-1], meta_batch)
        self.raw.grad = g.detach().clone()
        self.meta_opt.step()
        self.meta_opt.zero_grad(set_to_none=True)
        return {"inner_losses": losses, "hypergradient": g.detach().numpy().copy(),
                "raw_weights": self.raw.detach().numpy().copy(), **info}


def main(argv=None) -> dict:
    import jax

    from benchmarks import _common
    from dreamprm_jax.models import prm, qwen2_vl

    p = argparse.ArgumentParser(prog="python -m benchmarks.reference_torch",
                                description="One DreamPRM iteration (transformers + Betty DARTS) in PyTorch.")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    config = qwen2_vl.demo(hidden_size=a.hidden, num_hidden_layers=a.layers)
    spec = _common.ProblemSpec(batch=a.batch, seed=a.seed)
    params = jax.device_get(prm.init(config, jax.random.key(a.seed)))
    problem = _common.make_problem(config, spec)
    ref = TorchReference(config, params, spec.num_domains, threads=a.threads)
    inner = [ref.inputs(b) for b in problem["inner_hf"]]
    meta = ref.inputs(problem["meta_hf"])
    t0 = time.perf_counter()
    out = ref.iteration(inner, meta)
    dt = time.perf_counter() - t0
    print(f"inner losses {np.round(out['inner_losses'], 6).tolist()}  meta loss {out['meta_loss']:.6f}")
    print(f"DARTS hypergradient {out['hypergradient']}  raw weights {out['raw_weights']}  ({dt:.2f} s, "
          f"{torch.get_num_threads()} threads)")
    return out


if __name__ == "__main__":
    main()
