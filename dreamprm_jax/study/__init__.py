"""The reweighting study: does learning domain weights make a PRM better at best-of-N
selection, by how much, and how sure are we (paired CIs over questions, several seeds)?

    from dreamprm_jax.study import StudyConfig, run_study, write_study
    results = run_study(StudyConfig(seeds=(0,), arms=("vanilla", "dreamprm", "oracle_weights")))
    paths, text = write_study(config, results, wall_seconds)
"""

from dreamprm_jax.study.arms import ARMS, BASELINE_ARM, Arm, get_arms
from dreamprm_jax.study.runner import StudyConfig, UserData, read_oracle_weights, run_study
from dreamprm_jax.study.report import summarize, write_study

__all__ = ["ARMS", "BASELINE_ARM", "Arm", "get_arms", "StudyConfig", "UserData", "read_oracle_weights", "run_study",
           "summarize", "write_study"]
