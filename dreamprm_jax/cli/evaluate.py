"""Best-of-N evaluation of process reward models: the paper's comparison table.

With no arguments: evaluates the default training runs on the generated best-of-N test
set (runs/synthetic/test_bon.json) — DreamPRM = runs/default/export, the vanilla PRM =
runs/vanilla/export — and writes runs/eval/best_of_n.{txt,json,png}:

    python -m experiments.evaluate
    python -m experiments.evaluate --train-missing            # train whichever run is missing
    python -m experiments.evaluate --aggregations all --ns 2 4 8 --trials 20 --seed 1
    python -m experiments.evaluate --candidates my_bon.jsonl --image-root imgs \\
        --prm mine=runs/mine/export --on-bad-record skip --out runs/eval_mine

Installed, ``dreamprm-evaluate`` is the same command.

Methods in one report: zero-shot (the first candidate), random, self-consistency
(majority vote), outcome-only (each whole chain scored once by the DreamPRM model),
every PRM with every chosen aggregation of its step logits ("<name>/<aggregation>"),
and the oracle (pass@N). Accuracy per benchmark and overall for each N, as mean ± std
over random candidate subsets (fixed seed); step-level error detection when the file
has step labels. Scoring throughput (chains/s, prefixes/s) and jit compile counts (which
depend on what the process compiled before) are printed and stored under
"extra.throughput" in the JSON; every other number in the JSON is deterministic for a
given seed.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dreamprm_jax.evaluation import ReportFiles, SweepResult

PROG = "dreamprm-evaluate"

DEFAULT_CANDIDATES = os.path.join("runs", "synthetic", "test_bon.json")
DREAMPRM = "dreamprm"
VANILLA = "vanilla_prm"
#: name -> (export directory, training command, TrainConfig overrides); in table order.
DEFAULT_RUNS: dict[str, tuple[str, str, dict[str, Any]]] = {
    VANILLA: (os.path.join("runs", "vanilla", "export"),
              "python -m experiments.train --no-reweighting --out-dir runs/vanilla",
              {"reweighting": False, "out_dir": os.path.join("runs", "vanilla")}),
    DREAMPRM: (os.path.join("runs", "default", "export"), "python -m experiments.train",
               {"out_dir": os.path.join("runs", "default")}),
}


class SetupError(Exception):
    """Something the evaluation needs is missing; the message says what to run."""


# ----------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------

def _prm_spec(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=EXPORT_DIR, got {text!r}")
    if "/" in name:
        raise argparse.ArgumentTypeError(f"PRM name {name!r} must not contain '/' (it names table rows)")
    return name.strip(), path.strip()


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    from dreamprm_jax.evaluation.aggregation import aggregation_names

    p = argparse.ArgumentParser(prog=prog, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--candidates", default=None, metavar="FILE",
                      help=f"best-of-N candidate file, JSON array or JSON Lines (default: {DEFAULT_CANDIDATES}, "
                           "the generated test set)")
    data.add_argument("--image-root", default=None, metavar="DIR",
                      help="directory that image_path values are resolved against; images may not escape it "
                           "(default: the candidate file's directory)")
    data.add_argument("--on-bad-record", choices=("error", "skip"), default="error",
                      help="an invalid record (missing image, candidate without steps, empty candidate list, "
                           "missing gold answer, ...) stops with an error naming file, record and field, or is "
                           "skipped and counted per reason in the report (default: error)")
    data.add_argument("--correct-source", choices=("auto", "label", "match"), default="auto",
                      help="candidate correctness: the file's 'correct' labels, answer matching against the "
                           "gold answer, or labels where present and matching elsewhere (default: auto)")

    models = p.add_argument_group("models")
    models.add_argument("--prm", action="append", type=_prm_spec, default=None, metavar="NAME=EXPORT_DIR",
                        help="a PRM to evaluate, as a table name and an exported PRM directory (prm.save + "
                             "tokenizer, as <run>/export from experiments.train); repeatable, table order = "
                             f"command-line order (default: {VANILLA}={DEFAULT_RUNS[VANILLA][0]} and "
                             f"{DREAMPRM}={DEFAULT_RUNS[DREAMPRM][0]})")
    models.add_argument("--outcome-prm", default=None, metavar="NAME",
                        help="the PRM that scores each whole chain once for the outcome-only baseline; 'none' "
                             f"drops the baseline (default: {DREAMPRM} when evaluated, else the last --prm)")
    models.add_argument("--train-missing", action="store_true",
                        help="when a default run's export is missing, train it here first (the default "
                             "DreamPRM / vanilla training configuration; minutes on a CPU); a missing default "
                             "test set is generated")
    models.add_argument("--batch-size", type=int, default=16,
                        help="sequences per forward pass while scoring (default: 16)")
    models.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="compute dtype of the PRM (parameters stay float32; default: float32)")
    models.add_argument("--max-image-side", type=int, default=None,
                        help="resize images whose longest side is larger (default: the export's settings, "
                             "else the training default 512)")
    models.add_argument("--min-pixels", type=int, default=None,
                        help="Qwen2-VL image processor min_pixels (default: the export's preprocessor_config.json, "
                             "else the training default)")
    models.add_argument("--max-pixels", type=int, default=None,
                        help="Qwen2-VL image processor max_pixels (default: as --min-pixels)")

    sel = p.add_argument_group("selection")
    sel.add_argument("--aggregation", default="mean", choices=aggregation_names(),
                     help="how a PRM's step logits make a chain score: mean (DreamPRM's code), sum (the paper), "
                          "min, max, log_prod, last, mean_prob (default: mean)")
    sel.add_argument("--aggregations", nargs="+", default=None, metavar="NAME",
                     help="several aggregations in one report, each a row per PRM ('all': every registered "
                          "one); overrides --aggregation")
    sel.add_argument("--ns", type=int, nargs="+", default=[2, 4, 8], metavar="N",
                     help="candidate counts of the N sweep; the full candidate count is always included "
                          "and larger N are skipped (default: 2 4 8)")
    sel.add_argument("--trials", type=int, default=20,
                     help="random candidate subsets per N; accuracies are mean ± std over them (default: 20)")
    sel.add_argument("--seed", type=int, default=0, help="seed of the subsets and of the random baseline (default: 0)")
    sel.add_argument("--threshold", type=float, default=0.5,
                     help="step-level metrics: a step is predicted correct when sigmoid(logit) >= this "
                          "(default: 0.5)")

    out = p.add_argument_group("output")
    out.add_argument("--out", default=os.path.join("runs", "eval"), metavar="DIR",
                     help="writes best_of_n.txt (tables), best_of_n.json (every number) and best_of_n.png "
                          "(accuracy versus N) here (default: runs/eval)")
    out.add_argument("--no-progress", dest="progress", action="store_false",
                     help="no progress bars")
    return p


# ----------------------------------------------------------------------------------------
# Setup: which files, which models; train or explain what is missing
# ----------------------------------------------------------------------------------------

def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _train_default(name: str, args) -> None:
    from dreamprm_jax.cli import train as train_cli
    from dreamprm_jax.configs import TrainConfig

    export_dir, command, overrides = DEFAULT_RUNS[name]
    _say(f"[train] {export_dir} is missing; training it now ({command})")
    cfg = dataclasses.replace(TrainConfig(), progress=args.progress, **overrides)
    _say(train_cli.format_run(train_cli.run(cfg)))
    if not os.path.isdir(export_dir):
        raise SetupError(f"training {name} finished but wrote no export at {export_dir}")


def resolve_setup(args) -> tuple[str, dict[str, str]]:
    """(candidate file, {prm name: export dir}); trains or explains what is missing."""
    from dreamprm_jax.models import prm

    prms = dict(args.prm) if args.prm else {n: spec[0] for n, spec in DEFAULT_RUNS.items()}
    if args.prm and len(dict(args.prm)) != len(args.prm):
        raise SetupError(f"--prm: each NAME must be used once, got {[n for n, _ in args.prm]}")
    candidates = args.candidates or DEFAULT_CANDIDATES

    def is_export(path: str) -> bool:
        return os.path.isfile(os.path.join(path, prm.HEAD_FILE)) and os.path.isfile(os.path.join(path, "config.json"))

    defaults = {n: d for n, d in prms.items() if n in DEFAULT_RUNS and d == DEFAULT_RUNS[n][0]}
    missing_defaults = [n for n in defaults if not is_export(defaults[n])]
    if missing_defaults and args.train_missing:
        for name in missing_defaults:
            _train_default(name, args)
        missing_defaults = [n for n in defaults if not is_export(defaults[n])]

    if args.train_missing and args.candidates is None and not os.path.isfile(candidates):
        from dreamprm_jax.data import synthetic

        _say(f"[data] {candidates} is missing; generating the default benchmark")
        synthetic.generate(os.path.dirname(candidates), synthetic.default_config(), progress=args.progress,
                           reuse=True)

    problems = []
    for name, path in prms.items():
        if is_export(path):
            continue
        if name in missing_defaults:
            problems.append(f"  {name}: no exported PRM at {path}; train it with\n      {DEFAULT_RUNS[name][1]}")
        else:
            what = "does not exist" if not os.path.isdir(path) else f"lacks config.json or {prm.HEAD_FILE}"
            hint = ""
            if os.path.basename(os.path.normpath(path)) == "export":
                hint = f"; train it with\n      python -m experiments.train --out-dir {os.path.dirname(os.path.normpath(path))}"
            problems.append(f"  {name}: {path} {what} (expected an exported PRM directory, <run>/export){hint}")
    if not os.path.isfile(candidates):
        if args.candidates is None:
            problems.append(f"  candidates: {candidates} does not exist; the default training run generates it "
                            "(python -m experiments.train), or\n      python -m experiments.make_synthetic --out "
                            f"{os.path.dirname(candidates)}")
        else:
            problems.append(f"  candidates: {candidates} does not exist (expected a best-of-N candidate file)")
    if problems:
        tail = ("\n(or pass --train-missing to train the missing default runs first)"
                if missing_defaults and not args.train_missing else "")
        raise SetupError("cannot evaluate; missing:\n" + "\n".join(problems) + tail)
    return candidates, prms


# ----------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------

def _aggregations(args) -> tuple[str, ...]:
    from dreamprm_jax.evaluation.aggregation import aggregation_names

    if args.aggregations is None:
        return (args.aggregation,)
    names = tuple(aggregation_names()) if args.aggregations == ["all"] else tuple(args.aggregations)
    unknown = [a for a in names if a not in aggregation_names()]
    if unknown:
        raise SetupError(f"--aggregations: unknown {unknown}; expected names among {list(aggregation_names())} or 'all'")
    return tuple(dict.fromkeys(names))


def _throughput_line(name: str, what: str, stats: dict[str, Any], compile_count: int) -> str:
    return (f"[throughput] {name} {what}: {stats['num_chains']} chains / {stats['num_requests']} sequences in "
            f"{stats['seconds']:.1f} s = {stats['chains_per_s']:.2f} chains/s, {stats['prefixes_per_s']:.1f} "
            f"sequences/s; {stats['steady_chains_per_s']:.2f} chains/s without the "
            f"{stats['compile_seconds']:.1f} s of compilation ({stats['num_batches']} batches, buckets {stats['buckets']}, "
            f"{compile_count} compiled programs)")


@dataclasses.dataclass
class EvaluationRun:
    """What :func:`run` produced: the report it wrote, the selection sweep, and the scoring
    throughput per ``"<prm>/steps"`` / ``"<prm>/outcome"``."""

    report: ReportFiles
    result: SweepResult
    throughput: dict[str, dict[str, Any]]


def run(args) -> EvaluationRun:
    """Load, score, select, write the report and print it."""
    from dreamprm_jax import evaluation as inf
    from dreamprm_jax.evaluation import prm_scorer

    candidates_path, prms = resolve_setup(args)
    aggregations = _aggregations(args)
    outcome = args.outcome_prm
    if outcome is None:
        outcome = DREAMPRM if DREAMPRM in prms else list(prms)[-1]
    elif outcome.lower() == "none":
        outcome = None
    elif outcome not in prms:
        raise SetupError(f"--outcome-prm {outcome!r}: not one of the evaluated PRMs {list(prms)}")

    questions, load_report = inf.load_candidates(candidates_path, image_root=args.image_root,
                                                 on_bad_record=args.on_bad_record)
    if load_report.num_skipped:
        _say(f"[data] skipped {load_report.num_skipped} of {load_report.num_records} records: "
                   f"{dict(load_report.skipped)}")
    if not questions:
        raise SetupError(f"{candidates_path}: no valid record to evaluate ({load_report.num_records} records)")
    inputs = inf.build_inputs(questions, correct_source=args.correct_source)
    labels = inf.step_label_array(questions)                       # [Q, N, S]
    has_step_labels = bool((labels >= 0).any())
    num_prefixes = sum(c.num_steps for q in questions for c in q.candidates)
    num_chains = sum(q.num_candidates for q in questions)
    _say(f"[data] {len(questions)} questions, {num_chains} candidate chains, {num_prefixes} step prefixes "
               f"from {candidates_path}")

    step_scores, outcome_logits, throughput, scoring_info = {}, {}, {}, {}
    for name, export_dir in prms.items():
        scorer = prm_scorer.load_scorer(export_dir, batch_size=args.batch_size, dtype=args.dtype,
                                        progress=args.progress, desc=f"{name} steps",
                                        max_image_side=args.max_image_side, min_pixels=args.min_pixels,
                                        max_pixels=args.max_pixels)
        step_scores[name] = inf.score_steps(questions, scorer)
        stats = scorer.stats.to_dict()
        throughput[f"{name}/steps"] = stats
        _say(_throughput_line(name, "step prefixes", stats, scorer.compile_count))
        if name == outcome:
            scorer.reset_stats()
            scorer.desc = f"{name} outcome"
            outcome_logits[name] = inf.score_chains(questions, scorer)
            stats = scorer.stats.to_dict()
            throughput[f"{name}/outcome"] = stats
            _say(_throughput_line(name, "whole chains", stats, scorer.compile_count))
        throughput[f"{name}/steps"]["compile_count"] = scorer.compile_count
        scoring_info[name] = {"export_dir": export_dir, "batch_size": args.batch_size, "dtype": args.dtype,
                              "seq_buckets": list(scorer.spec.seq_buckets),
                              "patch_buckets": list(scorer.spec.patch_buckets),
                              "processor": {"max_image_side": scorer.processor.max_image_side,
                                            "min_pixels": scorer.processor.min_pixels,
                                            "max_pixels": scorer.processor.max_pixels}}
        del scorer

    methods = inf.standard_methods(prm_scores=step_scores, aggregations=aggregations,
                                   outcome_logits=outcome_logits)
    result = inf.evaluate(inputs, methods, ns=args.ns, num_trials=args.trials, seed=args.seed)

    steps_by_prm = None
    primary = None
    if has_step_labels:
        steps_by_prm = {name: inf.step_metrics(s.step_logits, labels, benchmarks=inputs.benchmarks,
                                               threshold=args.threshold) for name, s in step_scores.items()}
        primary = DREAMPRM if DREAMPRM in steps_by_prm else list(steps_by_prm)[-1]

    extra = {
        "candidates": candidates_path,
        "prms": dict(prms),
        "aggregations": list(aggregations),
        "outcome_prm": outcome,
        "correct_source": args.correct_source,
        "label_disagreements": inputs.label_disagreements,
        "num_chains": num_chains,
        "num_step_prefixes": num_prefixes,
        "scoring": scoring_info,
        "step_metrics_prm": primary,
        "step_metrics_by_prm": steps_by_prm,
        "throughput": throughput,
        "nondeterministic_fields": ["extra.throughput"],
    }
    # The primary PRM's step table (and its numbers in the JSON), the others' tables after it.
    others = None if primary is None else {name: m for name, m in steps_by_prm.items() if name != primary}
    report = inf.write_report(args.out, result, step_metrics=None if primary is None else steps_by_prm[primary],
                              step_metrics_label=primary, more_step_metrics=others, load_report=load_report,
                              extra=extra)
    print(report.text.rstrip())
    for key, stats in throughput.items():
        print(f"throughput {key}: {stats['chains_per_s']:.2f} chains/s, {stats['prefixes_per_s']:.1f} sequences/s "
              f"({stats['seconds']:.1f} s incl. encoding and {stats['compile_seconds']:.1f} s compilation; "
              f"{stats['steady_chains_per_s']:.2f} chains/s without compilation)")
    print(f"wrote {report.text_path}, {report.json_path}, {report.png_path}")
    return EvaluationRun(report, result, throughput)


def main(argv=None, prog: str = PROG) -> int:
    args = build_parser(prog).parse_args(argv)
    if args.batch_size < 1:
        print(f"error: --batch-size must be >= 1, got {args.batch_size}", file=sys.stderr)
        return 2
    from dreamprm_jax.evaluation.candidates import CandidateError
    from dreamprm_jax.evaluation.prm_scorer import ExportNotFoundError

    try:
        run(args)
    except (SetupError, CandidateError, ExportNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
