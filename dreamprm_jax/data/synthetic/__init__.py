"""A generated multimodal PRM benchmark whose domain qualities are planted and recorded.

Images (bar charts, counting grids, polygons) with questions; five-step chains of thought
whose planted errors are of three types (A: the value zero, blatant; B: a number word out
of every task's range, learnable; C: an in-range value contradicting the image, subtle);
simulated Monte-Carlo step labels; five training domains of planted quality (two clean,
one narrow, one large and misleading about type B, one with noise images); a meta set and
a large best-of-N test set drawn from one distribution on separate questions, with chain
texts disjoint across the three sets.  The right domain weights (recorded in the manifest
as ``oracle_weights``) make a visibly better best-of-N selector than uniform ones.
``generate(out_dir, default_config())`` writes it all; see :mod:`.generate` for the
layout, :mod:`.tasks` for the chains and :mod:`.domains` for the qualities.
"""

from dreamprm_jax.data.synthetic.domains import (
    TEST_ERROR_MIX, DomainSpec, corrupt_scores, default_domains, mislabel, rollout_scores)
from dreamprm_jax.data.synthetic.generate import (
    GENERATOR_VERSION, SyntheticConfig, best_of_n_baselines, default_config, domain_records, generate, load_manifest,
    meta_records, oracle_weights, planted_qualities, select_domains, test_questions, tiny_config)
from dreamprm_jax.data.synthetic.tasks import (
    ERROR_TYPES, NUM_STEPS, TASKS, Chain, Problem, chain_text, make_chain, make_chain_in_split, prefix_text,
    render_problem, sample_problem, text_split)

__all__ = [
    "TEST_ERROR_MIX", "DomainSpec", "corrupt_scores", "default_domains", "mislabel", "rollout_scores",
    "GENERATOR_VERSION", "SyntheticConfig", "best_of_n_baselines", "default_config", "domain_records", "generate",
    "load_manifest", "meta_records", "oracle_weights", "planted_qualities", "select_domains", "test_questions",
    "tiny_config",
    "ERROR_TYPES", "NUM_STEPS", "TASKS", "Chain", "Problem", "chain_text", "make_chain", "make_chain_in_split",
    "prefix_text", "render_problem", "sample_problem", "text_split",
]
