"""How far a hypergradient is from a reference one (usually ``exact``).

For ``g`` and the reference ``g_ref`` (pytrees, flattened to vectors)::

    cosine        = <g, g_ref> / (||g|| ||g_ref||)
    rel_err       = ||g - g_ref|| / ||g_ref||
    sign_agree    = share of the coordinates (the K domains) where sign(g) == sign(g_ref)

The cosine and the sign agreement are scale-free (DARTS in Betty's convention carries no
inner learning-rate factor, so its scale differs from ``exact`` by design); the relative
error is not. A zero vector has cosine 0 with anything; against a zero reference the
relative error is 0 for a zero ``g`` and infinite otherwise.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np

__all__ = ["Agreement", "agreement", "flatten"]


class Agreement(NamedTuple):
    """One hypergradient against the reference; NaN everywhere when ``g`` is not finite."""

    finite: bool
    cosine: float
    rel_err: float
    sign_agree: float  # share of the coordinates with the reference's sign, in [0, 1]


def flatten(tree: Any) -> np.ndarray:
    """Every leaf of ``tree`` raveled and concatenated, float64 ``[n]``."""
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


def agreement(g: Any, reference: Any) -> Agreement:
    """:class:`Agreement` of ``g`` with ``reference`` (same tree structure); see the module docstring."""
    g, ref = flatten(g), flatten(reference)
    if g.shape != ref.shape:
        raise ValueError(f"agreement: hypergradient has {g.size} entries, the reference {ref.size}; expected equal")
    if not np.all(np.isfinite(g)):
        return Agreement(False, float("nan"), float("nan"), float("nan"))
    norm_g, norm_ref = np.linalg.norm(g), np.linalg.norm(ref)
    cosine = float(g @ ref / (norm_g * norm_ref)) if norm_g > 0 and norm_ref > 0 else 0.0
    if norm_ref > 0:
        rel_err = float(np.linalg.norm(g - ref) / norm_ref)
    else:
        rel_err = 0.0 if norm_g == 0 else float("inf")
    sign_agree = float(np.mean(np.sign(g) == np.sign(ref)))
    return Agreement(True, cosine, rel_err, sign_agree)
