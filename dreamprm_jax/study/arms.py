"""The arms of a reweighting study: how each PRM is trained, all on the same budget.

Every arm trains from the same initialisation (the seed's), on the same records, with the
same sampler and iteration count; only the weights (and how they are learned) differ, except
in ``vanilla_reseeded``, which changes the initialisation and data order alone:

==================================  ===========================================================================
``vanilla``                         uniform weights (the PRM without reweighting): the baseline every arm is
                                    compared with
``vanilla_reseeded``                uniform weights again, from another initialisation and data order: how
                                    far training noise alone moves best-of-N (a paired CI over questions
                                    holds the trained PRMs fixed; this arm shows what it leaves out)
``dreamprm``                        weights learned with exact hypergradients through the T unrolled steps
                                    (DreamPRM's chain-MSE meta loss)
``darts``                           weights learned with Betty's DARTS approximation (the paper's method)
``dreamprm_listwise``               as ``dreamprm``, with the listwise ranking meta loss (a softmax over
                                    each meta question's candidates) instead of the chain MSE
``dreamprm_pairwise``               as ``dreamprm``, with the pairwise ranking meta loss (each correct
                                    candidate of a meta question above each wrong one)
``dreamprm_pairwise_norm``          as ``dreamprm_pairwise``, on scores divided by their within-question
                                    standard deviation (no credit for a more confident PRM alone)
``instance_table``                  a learned weight per training record (DreamPRM-1.5's Instance Table), exact
                                    hypergradients
``instance_table_listwise``         ``instance_table`` with the listwise meta loss and one second moment
                                    shared by the table's entries (``--meta-second-moment shared``, meta lr
                                    0.3), the variant that separated wrong labels best on seed 0
``instance_table_label``            ``instance_table`` with each batch's weights divided by the mean weight of
                                    the rows on the same side of label 0.5 (``--instance-normalize label``): the
                                    weights cannot shift the PRM's scores as a whole, only pick which records
                                    of a label group to trust
``instance_net``                    a small network from each record's loss and domain to its weight
                                    (DreamPRM-1.5's Instance Net), exact hypergradients
``instance_net_listwise``           ``instance_net`` with the listwise meta loss and a tenth of the meta
                                    learning rate (0.003): the net's output moves every record's weight at
                                    once, and at the default rate its weights swing between 0 and 2
``small_loss``                      a weight per training record fixed from the vanilla PRM's loss on it
                                    (``train.record_losses.small_loss_weights``: ranked, smallest loss
                                    highest, mean 1), nothing learned: what the small-loss heuristic alone does
                                    for selection, to set the learned instance weights against
``oracle_weights``                  weights fixed by hand from the planted (or user-given) domain quality: how
                                    much room correct weights leave; an arm that needs them is skipped when
                                    there are none
==================================  ===========================================================================

The untrained baselines (self-consistency, a random pick, the oracle answer) need no arm.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

__all__ = ["Arm", "ARMS", "BASELINE_ARM", "get_arms"]

#: The arm every other arm is compared with.
BASELINE_ARM = "vanilla"


@dataclasses.dataclass(frozen=True)
class Arm:
    """``overrides``: :class:`~dreamprm_jax.configs.TrainConfig` fields set for this arm;
    ``oracle_weights``: train under the oracle domain weights, held fixed; ``loss_weights``: train
    under per-record weights from the vanilla PRM's losses, held fixed (the baseline arm runs
    first, see :func:`get_arms`); ``seed_offset``:
    added to the study seed for the initialisation and data order (the data stay the seed's)."""

    name: str
    description: str
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    oracle_weights: bool = False
    loss_weights: bool = False
    seed_offset: int = 0


ARMS: dict[str, Arm] = {
    "vanilla": Arm("vanilla", "uniform domain weights", {"reweighting": False}),
    "vanilla_reseeded": Arm("vanilla_reseeded", "uniform domain weights, another initialisation and data order",
                            {"reweighting": False}, seed_offset=1000),
    "dreamprm": Arm("dreamprm", "learned weights, exact hypergradients", {"reweighting": True, "hypergradient": "exact"}),
    "darts": Arm("darts", "learned weights, DARTS hypergradients", {"reweighting": True, "hypergradient": "darts"}),
    "dreamprm_listwise": Arm("dreamprm_listwise", "learned weights, exact hypergradients, listwise meta loss",
                             {"reweighting": True, "hypergradient": "exact", "meta_loss": "listwise"}),
    "dreamprm_pairwise": Arm("dreamprm_pairwise", "learned weights, exact hypergradients, pairwise meta loss",
                             {"reweighting": True, "hypergradient": "exact", "meta_loss": "pairwise"}),
    "dreamprm_pairwise_norm": Arm(
        "dreamprm_pairwise_norm", "learned weights, exact hypergradients, scale-free pairwise meta loss",
        {"reweighting": True, "hypergradient": "exact", "meta_loss": "pairwise_normalized"}),
    "instance_table": Arm("instance_table", "a learned weight per training record, exact hypergradients",
                          {"reweighting": True, "hypergradient": "exact", "weighting": "instance_table"}),
    "instance_table_listwise": Arm(
        "instance_table_listwise", "a learned weight per training record, listwise meta loss, shared second moment",
        {"reweighting": True, "hypergradient": "exact", "weighting": "instance_table", "meta_loss": "listwise",
         "meta_second_moment": "shared", "meta_lr": 0.3}),
    "instance_table_label": Arm(
        "instance_table_label", "a learned weight per training record, normalised within each label group",
        {"reweighting": True, "hypergradient": "exact", "weighting": "instance_table", "instance_normalize": "label"}),
    "instance_net": Arm("instance_net", "record weights from a small net (loss, domain), exact hypergradients",
                        {"reweighting": True, "hypergradient": "exact", "weighting": "instance_net"}),
    "instance_net_listwise": Arm(
        "instance_net_listwise", "instance_net with the listwise meta loss, meta lr 0.003",
        {"reweighting": True, "hypergradient": "exact", "weighting": "instance_net", "meta_loss": "listwise",
         "meta_lr": 0.003}),
    "small_loss": Arm("small_loss", "a weight per record fixed from the vanilla PRM's loss (smallest loss highest)",
                      {"reweighting": False, "weighting": "instance_table"}, loss_weights=True),
    "oracle_weights": Arm("oracle_weights", "weights fixed from the planted quality", {"reweighting": False},
                          oracle_weights=True),
}


def get_arms(names) -> tuple[Arm, ...]:
    """The named arms, the baseline first (added when missing)."""
    names = list(dict.fromkeys(names))
    unknown = [n for n in names if n not in ARMS]
    if unknown:
        raise ValueError(f"unknown study arm(s) {unknown}; expected names among {sorted(ARMS)}")
    if BASELINE_ARM in names:
        names.remove(BASELINE_ARM)
    return (ARMS[BASELINE_ARM],) + tuple(ARMS[n] for n in names)
