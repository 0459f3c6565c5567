"""Rematerialisation: one rule from a ``remat`` setting to a ``jax.checkpoint`` wrapper.

Used by the model's per-block remat (``Qwen2VLConfig.remat``) and by the bi-level engine's
per-inner-step remat (``inner.unroll(remat=...)``).
"""

from __future__ import annotations

from typing import Any, Callable

import jax

__all__ = ["remat_policy", "apply_remat"]


def remat_policy(remat: Any) -> tuple[bool, Callable | None]:
    """``(wrap, policy)`` for a remat setting.

    * ``None``, ``False``, ``"none"``: no ``jax.checkpoint`` (``wrap`` is False);
    * ``True``, ``"full"``: recompute everything (``jax.checkpoint_policies.nothing_saveable``,
      which ``jax.checkpoint`` also uses when given no policy);
    * any other string: the ``jax.checkpoint_policies`` member of that name
      (``"dots_saveable"``, ...);
    * a callable: used as the policy.
    """
    if remat is None or remat is False or remat == "none":
        return False, None
    if remat is True or remat == "full":
        return True, jax.checkpoint_policies.nothing_saveable
    if isinstance(remat, str):
        policy = getattr(jax.checkpoint_policies, remat, None)
        if policy is None:
            raise ValueError(f"remat: expected 'none', 'full' or a jax.checkpoint_policies member, got {remat!r}")
        return True, policy
    if callable(remat):
        return True, remat
    raise TypeError(f"remat: expected a bool, a str or a callable policy, got {type(remat).__name__}")


def apply_remat(fn: Callable, remat: Any, *, prevent_cse: bool = True) -> Callable:
    """``fn`` under ``jax.checkpoint`` with the policy :func:`remat_policy` picks (or ``fn`` itself)."""
    wrap, policy = remat_policy(remat)
    return jax.checkpoint(fn, policy=policy, prevent_cse=prevent_cse) if wrap else fn
