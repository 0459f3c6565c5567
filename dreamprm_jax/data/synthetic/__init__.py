"""A generated multimodal PRM benchmark whose domain qualities are planted and recorded.

Images (bar charts, counting grids, polygons) with questions, five-step chains of thought
whose errors are copy-consistency errors visible in the text, simulated Monte-Carlo step
labels, six training domains of planted quality (clean at two difficulties, trivial,
label noise, uninformative images, flipped labels), a balanced clean meta set and a
best-of-N test set.  ``generate(out_dir, default_config())`` writes it all; see
:mod:`.generate` for the layout and :mod:`.domains` for the qualities.
"""

from dreamprm_jax.data.synthetic.domains import DomainSpec, corrupt_scores, default_domains, rollout_scores
from dreamprm_jax.data.synthetic.generate import (
    GENERATOR_VERSION, SyntheticConfig, best_of_n_baselines, default_config, domain_records, generate, load_manifest,
    meta_records, planted_qualities, select_domains, test_questions)
from dreamprm_jax.data.synthetic.tasks import (
    NUM_STEPS, TASKS, Chain, Problem, chain_text, make_chain, prefix_text, render_problem, sample_problem)

__all__ = [
    "DomainSpec", "corrupt_scores", "default_domains", "rollout_scores",
    "GENERATOR_VERSION", "SyntheticConfig", "best_of_n_baselines", "default_config", "domain_records", "generate",
    "load_manifest", "meta_records", "planted_qualities", "select_domains", "test_questions",
    "NUM_STEPS", "TASKS", "Chain", "Problem", "chain_text", "make_chain", "prefix_text", "render_problem",
    "sample_problem",
]
