"""Best-of-N evaluation: candidates, answers, step-score aggregation, selection, metrics.

The PRM enters only as a scoring callable ``score_fn(requests) -> logits [R]``::

    from dreamprm_jax import evaluation as inf

    questions, load_report = inf.load_candidates("candidates.jsonl", on_bad_record="skip")
    inputs = inf.build_inputs(questions)                       # answers, correctness
    dream = inf.score_steps(questions, dreamprm_score_fn)      # StepScores [Q, N, S]
    vanilla = inf.score_steps(questions, vanilla_score_fn)
    outcome = inf.score_chains(questions, orm_score_fn)        # [Q, N]
    methods = inf.standard_methods(prm_scores={"vanilla_prm": vanilla, "dreamprm": dream},
                                   aggregations=("mean", "sum"),
                                   outcome_logits={"orm": outcome})
    result = inf.evaluate(inputs, methods, ns=(2, 4, 8), num_trials=20, seed=0)
    steps = inf.step_metrics(dream.step_logits, inf.step_label_array(questions),
                             benchmarks=inputs.benchmarks)
    inf.write_report("runs/eval", result, step_metrics=steps, load_report=load_report)

Batching and bucketing with the real model live outside this package: ``score_fn``
receives :class:`StepRequest` tuples (candidate id, text, image path, indices).
"""

from dreamprm_jax.evaluation.aggregation import AGGREGATIONS, aggregate, aggregation_names, register_aggregation
from dreamprm_jax.evaluation.answers import (
    MatchConfig,
    answer_key,
    extract_final_answer,
    match_answer,
    normalize_text,
    parse_choice_letter,
    parse_number,
    register_matcher,
    unregister_matcher,
)
from dreamprm_jax.evaluation.candidates import (
    SKIP_REASONS,
    Candidate,
    CandidateError,
    LoadReport,
    Question,
    find_max_step,
    load_candidates,
    parse_records,
    step_prefixes,
)
from dreamprm_jax.evaluation.metrics import first_error_metrics, step_f1, step_metrics
from dreamprm_jax.evaluation.report import (
    ReportFiles,
    format_report,
    format_step_metrics,
    format_sweep_table,
    format_table,
    plot_accuracy_vs_n,
    report_dict,
    write_json,
    write_report,
)
from dreamprm_jax.evaluation.scoring import (
    StepRequest,
    StepScores,
    assemble_chain_logits,
    assemble_step_logits,
    chain_requests,
    default_prompt,
    score_chains,
    score_steps,
    step_label_array,
    step_requests,
)
from dreamprm_jax.evaluation.selection import (
    MajorityVote,
    Oracle,
    Random,
    ScoreArgmax,
    SelectionInputs,
    Stat,
    SweepResult,
    ZeroShot,
    build_inputs,
    evaluate,
    prm_selector,
    sample_subsets,
    standard_methods,
)

__all__ = [name for name in dir() if not name.startswith("_") and name not in {
    "aggregation", "answers", "candidates", "metrics", "report", "scoring", "selection", "statistics"}]
