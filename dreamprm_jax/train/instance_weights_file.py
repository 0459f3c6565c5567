"""The learned weight of every training record (instance weighting) and ``instance_weights.json``.

``instance_weights.json`` is one JSON object, record key -> weight, one entry per training
record in table order; the keys are :func:`dreamprm_jax.data.records.record_keys` (``"<id>/<sid>"``
where the records carry an id and a step id)::

    {"train-00000/1": 1.03, "train-00000/2": 0.97, ...}
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from dreamprm_jax.data.jsonfiles import read_number_map, write_number_map

__all__ = ["RecordWeights", "WEIGHTS_FILE", "read_record_weights"]

#: The file name in the run directory.
WEIGHTS_FILE = "instance_weights.json"


@dataclasses.dataclass(frozen=True)
class RecordWeights:
    """Per-record weights of a run: ``keys`` [N], ``domain_ids`` [N] int into ``domains``, ``weights`` [N]."""

    keys: tuple[str, ...]
    domain_ids: np.ndarray
    weights: np.ndarray
    domains: tuple[str, ...]

    def __post_init__(self):
        n = len(self.keys)
        if np.shape(self.domain_ids) != (n,) or np.shape(self.weights) != (n,):
            raise ValueError(f"RecordWeights: expected [N] domain ids and weights for N = {n} keys, got "
                             f"{np.shape(self.domain_ids)} and {np.shape(self.weights)}")
        if len(set(self.keys)) != n:
            raise ValueError("RecordWeights: record keys must be unique (see data.records.record_keys)")

    def domain_means(self) -> np.ndarray:
        """``[K]`` mean weight of each domain's records (NaN for a domain with none)."""
        out = np.full(len(self.domains), np.nan)
        for k in range(len(self.domains)):
            sel = self.domain_ids == k
            if sel.any():
                out[k] = float(np.mean(self.weights[sel]))
        return out

    def extremes(self, count: int = 3) -> dict[str, tuple[list[tuple[str, float]], list[tuple[str, float]]]]:
        """Per domain: (the ``count`` highest-weighted records, the ``count`` lowest), as (key, weight)."""
        out = {}
        for k, domain in enumerate(self.domains):
            idx = np.flatnonzero(self.domain_ids == k)
            order = idx[np.argsort(-self.weights[idx], kind="stable")]  # highest first
            top = [(self.keys[i], float(self.weights[i])) for i in order[:count]]
            bottom = [(self.keys[i], float(self.weights[i])) for i in order[::-1][:count]]
            out[domain] = (top, bottom)
        return out

    def write(self, out_dir: str) -> str:
        """``out_dir/instance_weights.json`` (written to a temporary file and renamed)."""
        return write_number_map(os.path.join(out_dir, WEIGHTS_FILE), dict(zip(self.keys, self.weights)))


def read_record_weights(path: str) -> dict[str, float]:
    """``{record key: weight}`` from an ``instance_weights.json``."""
    return read_number_map(path, "{record key: weight}")
