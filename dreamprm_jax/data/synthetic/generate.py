"""Write the synthetic benchmark: training domains, meta set, best-of-N test set.

Output layout under ``out_dir``::

    train.json      JSON array of DreamPRM training records, one per (chain, step k)
    meta.json       JSON array of meta records (question + full chain, true_false, question_id):
                    a few candidate chains per question, correct and wrong, half of all correct
    test_bon.json   JSON array of best-of-N questions in the candidate-file format
    images/*.png    one image per question (train_<domain>_<q>.png, meta_<i>.png, test_<i>.png)
    manifest.json   domains with planted qualities and oracle weights, counts, error types,
                    seed, config, generator version, sha256 of every file

What it measures.  The training domains (:mod:`.domains`) mix useful, narrow, noisy and
misleading supervision; the meta set and the test set are drawn from one distribution
(the test candidates' errors: 25 % type A, 50 % B, 25 % C; see :mod:`.tasks`) on
separate questions, as the paper's held-out meta set stands for its test benchmarks.
The test set is large (2,000 questions x 8 candidates by default: a paired bootstrap
over questions then resolves differences of a few points) and all its candidates of a
question share the question's one image, so it is fast to write and to score.

Text conventions (shared by all three files; see :mod:`.tasks`):

* chain = ``"Step 1: ...\\nStep 2: ...\\n...Step 5: ...\\nFinal answer: X"``;
* training record: ``input`` = question, ``add`` = ``"Step 1: ...\\n...Step k: ...\\n"``,
  ``id`` = chain id (shared by its five records), ``sid`` = k (1-based), ``true_label``
  = 1 iff the prefix has no error in its text, ``error_type`` = the chain's (A / B / C or
  null); ``accuracy`` is the planted (possibly defective) Monte-Carlo label;
* meta record: ``input`` = question + ``"\\n\\n"`` + chain, so its step prefix k (the text
  before ``Step k+1``) is byte-equal to a training text ``input + "\\n\\n" + add``;
  ``error_type`` as above; ``question_id`` shared by the candidates of one question;
* test candidate: ``text`` (the chain), ``correct``, ``step_labels`` (the true labels),
  ``error_type``.

De-duplication.  A full chain text belongs to exactly one of train, meta and test
(:func:`.tasks.text_split`, a fixed hash of the text): each set redraws paraphrases until
its text falls in its own share, so no chain text is in two sets, whatever their sizes.

Randomness: every part draws from its own generator, seeded by ``(seed, part, ...)`` with
stable (crc32) keys, so the output is a pure function of the config; dropping a domain
does not change the others; toggling a domain's label defects does not change its
chains.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import zlib
from collections import Counter
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from PIL import Image

from dreamprm_jax.data.synthetic import images as _images
from dreamprm_jax.data.synthetic.domains import (
    TEST_ERROR_MIX, DomainSpec, corrupt_scores, default_domains, mislabel, rollout_scores, sample_error_type,
    sample_first_error)
from dreamprm_jax.data.synthetic.tasks import (
    ERROR_STEPS, ERROR_TYPES, NUM_STEPS, STEP_SEPARATOR, TASKS, Chain, Problem, chain_text, make_chain_in_split,
    prefix_text, render_problem, sample_problem, sample_wrong_value)

__all__ = [
    "GENERATOR_VERSION", "SyntheticConfig", "default_config", "tiny_config", "select_domains", "generate", "load_manifest",
    "planted_qualities", "oracle_weights", "domain_records", "meta_records", "test_questions", "best_of_n_baselines",
]

GENERATOR_VERSION = "4"
_TRAIN, _META, _TEST, _MANIFEST = "train.json", "meta.json", "test_bon.json", "manifest.json"


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """What to generate. The defaults are the CPU demo's benchmark (a few seconds to write).

    Attributes:
      seed: the only source of randomness.
      train_per_domain: chains per training domain at scale 1 (each gives 5 step records); a
        domain's ``scale`` multiplies it.
      chains_per_question: chains sampled per question/image in the training domains
        (errors drawn independently per chain).
      meta: meta chains (half correct, half with an error at step 3, 4 or 5), on questions of
        their own, ``meta_candidates`` per question.
      meta_candidates: candidate chains per meta question (the ranking meta losses compare
        them); each question has at least one correct and one wrong candidate.
      test: best-of-N questions.
      candidates: candidate chains per test question.
      image_size: side of the square RGB images in pixels.
      times: Monte-Carlo rollouts per training prefix.
      domains: the training domains.
      tasks: question types of the meta and test sets.
      test_error_mix: fractions of the error types A, B, C among the wrong meta chains and
        the wrong test candidates.
    """

    seed: int = 0
    train_per_domain: int = 240
    chains_per_question: int = 2
    meta: int = 400
    meta_candidates: int = 4
    test: int = 2000
    candidates: int = 8
    image_size: int = 56
    times: int = 8
    domains: tuple[DomainSpec, ...] = dataclasses.field(default_factory=default_domains)
    tasks: tuple[str, ...] = TASKS
    test_error_mix: tuple[float, float, float] = TEST_ERROR_MIX

    def __post_init__(self):
        names = [d.name for d in self.domains]
        if len(set(names)) != len(names):
            raise ValueError(f"SyntheticConfig: domain names must be unique, got {names}")
        for field in ("train_per_domain", "chains_per_question", "meta_candidates", "candidates", "image_size", "times"):
            if getattr(self, field) < 1:
                raise ValueError(f"SyntheticConfig.{field} must be >= 1, got {getattr(self, field)}")
        for field in ("meta", "test"):
            if getattr(self, field) < 0:
                raise ValueError(f"SyntheticConfig.{field} must be >= 0, got {getattr(self, field)}")
        if self.image_size < 16:
            raise ValueError(f"SyntheticConfig.image_size must be >= 16 pixels, got {self.image_size}")
        if len(self.test_error_mix) != len(ERROR_TYPES) or min(self.test_error_mix) < 0 \
                or abs(sum(self.test_error_mix) - 1.0) > 1e-9:
            raise ValueError(f"SyntheticConfig.test_error_mix must be {len(ERROR_TYPES)} fractions (types "
                             f"{ERROR_TYPES}) summing to 1, got {self.test_error_mix}")

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["domains"] = [s.to_dict() for s in self.domains]
        d["tasks"] = list(self.tasks)
        d["test_error_mix"] = list(self.test_error_mix)
        return d


def default_config() -> SyntheticConfig:
    """The CPU-demo benchmark: 5 domains (8,400 step records), 100 x 4 meta chains, 2,000 x 8 test candidates."""
    return SyntheticConfig()


def tiny_config(seed: int = 0) -> SyntheticConfig:
    """The default design at a size for tests: 4 chains per domain (12 for misled_B), 2 x 4 meta chains, 6 test
    questions."""
    return SyntheticConfig(seed=seed, train_per_domain=4, meta=8, test=6, image_size=32)


def select_domains(config: SyntheticConfig, names: Sequence[str]) -> SyntheticConfig:
    """``config`` restricted to the named domains (in the given order)."""
    by_name = {d.name: d for d in config.domains}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(f"unknown domain(s) {unknown}; expected names from {list(by_name)}")
    return dataclasses.replace(config, domains=tuple(by_name[n] for n in names))


# ----------------------------------------------------------------------------------------
# Randomness
# ----------------------------------------------------------------------------------------

def _rng(seed: int, *key: str | int) -> np.random.Generator:
    """A generator for one part of the output, independent of every other part."""
    spawn_key = tuple(zlib.crc32(k.encode()) if isinstance(k, str) else int(k) for k in key)
    return np.random.default_rng(np.random.SeedSequence(entropy=seed, spawn_key=spawn_key))


# ----------------------------------------------------------------------------------------
# Training domains
# ----------------------------------------------------------------------------------------

ImageJob = tuple[str, Callable[[], Image.Image]]


def _domain_chains(spec: DomainSpec, config: SyntheticConfig) -> list[tuple[int, Problem, Chain]]:
    """(question index, problem, chain) for every chain of the domain (text stream only)."""
    rng = _rng(config.seed, "train", spec.name, "text")
    out = []
    problem = None
    for i in range(spec.num_chains(config.train_per_domain)):
        q, j = divmod(i, config.chains_per_question)
        if j == 0:
            problem = sample_problem(rng, spec.tasks)
        first_error = sample_first_error(spec, rng)
        error_type = sample_error_type(spec.error_mix, rng)
        wrong = sample_wrong_value(problem, rng, error_type) if first_error is not None else None
        out.append((q, problem, make_chain_in_split(problem, rng, "train", first_error, wrong)))
    return out


def _label_errors(spec: DomainSpec, chains: Sequence[Chain], rng: np.random.Generator) -> list[int | None]:
    """Per chain, the first error its Monte-Carlo labels are drawn from (the domain's label defect)."""
    if spec.hidden_labels:
        # the values in the chain are unverifiable: its success is an independent hidden chain's
        return [sample_first_error(spec, rng) for _ in chains]
    if spec.mislabel_type is not None:
        return mislabel([c.first_error for c in chains], [c.error_type for c in chains], spec.mislabel_type, rng)[0]
    return [c.first_error for c in chains]


def domain_records(spec: DomainSpec, config: SyntheticConfig) -> tuple[list[dict], np.ndarray, list[ImageJob]]:
    """The training records of one domain.

    Returns:
      records: 5 per chain, in chain order then step order.
      randomised: bool [len(records)], the records whose score was replaced by label noise.
      image_jobs: (relative path, renderer) per question.
    """
    chains = _domain_chains(spec, config)
    label_rng = _rng(config.seed, "train", spec.name, "labels")
    times = config.times
    label_errors = _label_errors(spec, [c for _, _, c in chains], label_rng)
    clean_scores, golds = [], []
    for (q, problem, chain), label_error in zip(chains, label_errors):
        gold = str(problem.answer)
        if label_error != chain.first_error and (label_error is None) != (chain.first_error is None):
            # the labels say "correct" iff the gold answer is the chain's own
            if label_error is None:
                gold = chain.answer
            else:
                lo, hi = problem.value_range
                gold = str(int(label_rng.choice([v for v in range(lo, hi + 1) if str(v) != chain.answer])))
        clean_scores.append(rollout_scores(label_error, spec, times, label_rng))
        golds.append(gold)
    clean = np.concatenate(clean_scores) if clean_scores else np.zeros(0, np.int64)  # [R]
    scores, randomised = corrupt_scores(clean, spec, times, _rng(config.seed, "train", spec.name, "corruption"))

    records: list[dict] = []
    jobs: list[ImageJob] = []
    image_rng = _rng(config.seed, "train", spec.name, "images")
    size = config.image_size
    chains_per_q = config.chains_per_question
    for c, (q, problem, chain) in enumerate(chains):
        rel = f"images/train_{spec.name}_{q:05d}.png"
        if c % chains_per_q == 0:
            if spec.image == "noise":
                noise = _images.render_noise(image_rng, size)
                jobs.append((rel, lambda img=noise: img))
            else:
                jobs.append((rel, lambda p=problem: render_problem(p, size)))
        chain_id = f"{spec.name}-{q:05d}-{c % chains_per_q}"
        true_labels = chain.step_labels()
        for k in range(1, NUM_STEPS + 1):
            score = int(scores[c * NUM_STEPS + k - 1])
            records.append({
                "id": chain_id,
                "sid": k,
                "input": problem.question,
                "add": prefix_text(chain.steps, k),
                "image_path": rel,
                "dataset": spec.name,
                "accuracy": score / times,
                "score": score,
                "times": times,
                "ground_truth": golds[c],
                "true_label": true_labels[k - 1],
                "error_type": chain.error_type,
            })
    return records, randomised, jobs


# ----------------------------------------------------------------------------------------
# Meta set and best-of-N test set
# ----------------------------------------------------------------------------------------

def _candidate_chain(problem: Problem, rng: np.random.Generator, split: str, correct: bool, popular: dict,
                     error_mix) -> Chain:
    """A best-of-N candidate: a correct chain, or one with an error of a type drawn from
    ``error_mix`` at a step drawn from 3..5 whose value is the question's ``popular`` wrong
    value of that type with probability 0.5."""
    if correct:
        return make_chain_in_split(problem, rng, split)
    error_type = sample_error_type(error_mix, rng)
    wrong = popular[error_type] if rng.random() < 0.5 else sample_wrong_value(problem, rng, error_type)
    step = int(ERROR_STEPS[int(rng.integers(len(ERROR_STEPS)))])
    return make_chain_in_split(problem, rng, split, step, wrong)


def _meta_correct_counts(sizes: Sequence[int], rng: np.random.Generator) -> list[int]:
    """Correct candidates per meta question: at least one correct and one wrong (2+ chains),
    and half of all chains correct: questions are paired and a pair of size-C questions gets
    (k, C - k) correct with k ~ U{1..C-1}; an unpaired question gets ceil(C / 2)."""
    counts = []
    for q, size in enumerate(sizes):
        if q % 2 == 1 and sizes[q - 1] == size and size > 1:
            counts.append(size - counts[-1])
        elif q + 1 < len(sizes) and sizes[q + 1] == size and size > 1:
            counts.append(int(rng.integers(1, size)))
        else:
            counts.append(size - size // 2)
    return counts


def meta_records(config: SyntheticConfig) -> tuple[list[dict], list[ImageJob]]:
    """Meta questions from the test distribution, ``meta_candidates`` chains each (``meta`` in all).

    A question's candidates are drawn like the test candidates (:func:`test_questions`: wrong
    ones with errors of ``test_error_mix``, often sharing the question's popular wrong value)
    and share its image; the numbers of correct ones come from :func:`_meta_correct_counts`.
    Questions of their own, texts in the meta share (:func:`.tasks.text_split`). Records carry
    ``question_id``, which groups them for the ranking meta losses.
    """
    rng = _rng(config.seed, "meta")
    n, per = config.meta, config.meta_candidates
    sizes = [min(per, n - start) for start in range(0, n, per)]
    records, jobs = [], []
    size_px = config.image_size
    for q, (size, n_correct) in enumerate(zip(sizes, _meta_correct_counts(sizes, rng))):
        problem = sample_problem(rng, config.tasks)
        popular = {t: sample_wrong_value(problem, rng, t) for t in ERROR_TYPES}
        chains = [_candidate_chain(problem, rng, "meta", c < n_correct, popular, config.test_error_mix)
                  for c in range(size)]
        rel = f"images/meta_{q:05d}.png"
        jobs.append((rel, lambda p=problem: render_problem(p, size_px)))
        for c, j in enumerate(rng.permutation(size)):
            chain = chains[int(j)]
            records.append({"id": f"meta-{q:05d}-{c}", "question_id": f"meta-{q:05d}",
                            "input": problem.question + "\n\n" + chain_text(chain), "image_path": rel,
                            "true_false": chain.correct, "error_type": chain.error_type})
    return records, jobs


def test_questions(config: SyntheticConfig) -> tuple[list[dict], list[ImageJob]]:
    """Best-of-N questions with ``candidates`` chains each.

    Per question: the policy's strength q ~ U(0.15, 0.65) and the number of correct
    candidates ~ Binomial(N, q); each wrong candidate has an error of a type drawn from
    ``test_error_mix`` at step 3-5.  A wrong B or C candidate takes the question's
    *popular* wrong value of its type with probability 0.5 (a systematic misreading shared
    across candidates; all A candidates share the value zero), so a wrong answer often
    out-votes the correct one.  Expected with the defaults: oracle ~0.94, majority vote
    ~0.55, random ~0.40 (the manifest records the exact values as ``test_baselines``).
    """
    rng = _rng(config.seed, "test")
    n_cand = config.candidates
    size = config.image_size
    out, jobs = [], []
    for i in range(config.test):
        problem = sample_problem(rng, config.tasks)
        strength = rng.uniform(0.15, 0.65)
        n_correct = int(rng.binomial(n_cand, strength))
        popular = {t: sample_wrong_value(problem, rng, t) for t in ERROR_TYPES}
        candidates = []
        for c in range(n_cand):
            chain = _candidate_chain(problem, rng, "test", c < n_correct, popular, config.test_error_mix)
            candidates.append({"text": chain_text(chain), "correct": chain.correct,
                               "step_labels": chain.step_labels(), "error_type": chain.error_type})
        candidates = [candidates[int(j)] for j in rng.permutation(n_cand)]
        rel = f"images/test_{i:05d}.png"
        jobs.append((rel, lambda p=problem: render_problem(p, size)))
        out.append({"id": f"test-{i:05d}", "benchmark": f"synthetic_{problem.task}", "image_path": rel,
                    "question": problem.question, "answer": str(problem.answer), "candidates": candidates})
    return out, jobs


def _final_answer(text: str) -> str:
    return text.rsplit("Final answer:", 1)[1].strip()


def best_of_n_baselines(questions: Sequence[dict]) -> dict[str, float]:
    """Oracle (any correct), majority vote (ties split evenly) and random-pick accuracy."""
    if not questions:
        return {"oracle": 0.0, "majority_vote": 0.0, "random": 0.0}
    oracle = vote = rand = 0.0
    for q in questions:
        correct = [c["correct"] for c in q["candidates"]]
        oracle += any(correct)
        rand += sum(correct) / len(correct)
        counts = Counter(_final_answer(c["text"]) for c in q["candidates"])
        top = max(counts.values())
        winners = [a for a, n in counts.items() if n == top]
        vote += (q["answer"] in winners) / len(winners)
    n = len(questions)
    return {"oracle": oracle / n, "majority_vote": vote / n, "random": rand / n}


# ----------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------

def _json_array_bytes(items: Iterable[dict]) -> bytes:
    """A JSON array with one item per line (diff-friendly, deterministic)."""
    body = ",\n".join(json.dumps(item, ensure_ascii=False) for item in items)
    return ("[\n" + body + "\n]\n").encode("utf-8") if body else b"[]\n"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _progress(iterable, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm
    return tqdm(iterable, total=total, desc=desc, unit="img", leave=False)


def load_manifest(out_dir: str | os.PathLike) -> dict[str, Any]:
    """The manifest.json of a generated benchmark."""
    path = os.path.join(out_dir, _MANIFEST)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no manifest; generate the benchmark first "
                                f"(python -m experiments.make_synthetic --out {out_dir})") from None


def planted_qualities(manifest: dict[str, Any]) -> dict[str, float]:
    """{domain name: planted quality} from a manifest (higher = better)."""
    return {d["name"]: float(d["quality"]) for d in manifest["domains"]}


def oracle_weights(manifest: dict[str, Any]) -> dict[str, float]:
    """{domain name: the weight an oracle arm trains with} from a manifest (relative weights)."""
    return {d["name"]: float(d["oracle_weight"]) for d in manifest["domains"]}


def _error_type_counts(error_types: Iterable[str | None]) -> dict[str, int]:
    """{type: count} over the wrong chains (None = correct is left out), every type listed."""
    counts = Counter(t for t in error_types if t is not None)
    return {t: counts.get(t, 0) for t in ERROR_TYPES}


def _verify(out_dir: str, manifest: dict[str, Any]) -> bool:
    """True when every JSON file has its recorded hash and images/ holds the recorded PNG count."""
    for name, info in manifest.get("files", {}).items():
        if name == "images":
            continue
        try:
            with open(os.path.join(out_dir, name), "rb") as f:
                if _sha256(f.read()) != info["sha256"]:
                    return False
        except OSError:
            return False
    image_dir = os.path.join(out_dir, "images")
    count = manifest.get("files", {}).get("images", {}).get("count", -1)
    return os.path.isdir(image_dir) and sum(n.endswith(".png") for n in os.listdir(image_dir)) == count


def generate(out_dir: str | os.PathLike, config: SyntheticConfig | None = None, *, progress: bool = False,
             reuse: bool = False) -> dict[str, Any]:
    """Write the benchmark to ``out_dir`` and return its manifest (also written as manifest.json).

    Args:
      out_dir: created if missing; previously generated images that this config does not
        produce are removed (only when ``out_dir`` holds a manifest of this generator).
      config: what to generate (default: :func:`default_config`).
      progress: show tqdm bars.
      reuse: if ``out_dir`` already holds a benchmark of this generator version with the
        same config and intact JSON files, return its manifest without writing anything.
    """
    config = config or default_config()
    out_dir = os.fspath(out_dir)
    config_dict = config.to_dict()
    previous = None
    if os.path.exists(os.path.join(out_dir, _MANIFEST)):
        try:
            previous = load_manifest(out_dir)
        except (json.JSONDecodeError, OSError):
            previous = None
        if previous is not None and previous.get("generator") != __package__:
            previous = None
    if reuse and previous is not None and previous.get("version") == GENERATOR_VERSION \
            and previous.get("config") == json.loads(json.dumps(config_dict)) and _verify(out_dir, previous):
        return previous

    # --- records ---------------------------------------------------------------------------
    train: list[dict] = []
    jobs: list[ImageJob] = []
    domain_info = []
    for spec in config.domains:
        records, randomised, domain_jobs = domain_records(spec, config)
        train.extend(records)
        jobs.extend(domain_jobs)
        chains = len(records) // NUM_STEPS
        last_steps = records[NUM_STEPS - 1::NUM_STEPS]
        accuracy = np.array([r["accuracy"] for r in records]).reshape(chains, NUM_STEPS)  # [C, S]
        domain_info.append({
            "name": spec.name, "quality": spec.quality, "oracle_weight": spec.oracle_weight,
            "description": spec.description, "corruption": spec.corruption(), "p_clean": spec.p_clean,
            "p_error": spec.p_error, "error_rate": spec.error_rate, "tasks": list(spec.tasks), "chains": chains,
            "records": len(records), "images": len(domain_jobs), "randomised_records": int(randomised.sum()),
            "error_types": _error_type_counts(r["error_type"] for r in last_steps),
            # chains whose final label disagrees with their text (planted defects, not MC noise)
            "mislabelled_chains": sum((r["score"] == r["times"]) != bool(r["true_label"]) for r in last_steps),
            "mean_accuracy": round(float(accuracy.mean()), 6),
            "mean_accuracy_by_step": [round(float(a), 6) for a in accuracy.mean(axis=0)],
        })
    meta, meta_jobs = meta_records(config)
    test, test_jobs = test_questions(config)
    jobs.extend(meta_jobs)
    jobs.extend(test_jobs)

    # --- files -----------------------------------------------------------------------------
    image_dir = os.path.join(out_dir, "images")
    os.makedirs(image_dir, exist_ok=True)
    image_hash = hashlib.sha256()
    for rel, render in _progress(jobs, len(jobs), "images", progress):
        data = _images.png_bytes(render())
        with open(os.path.join(out_dir, rel), "wb") as f:
            f.write(data)
        image_hash.update(rel.encode() + b"\0" + _sha256(data).encode() + b"\n")
    written = {rel for rel, _ in jobs}
    if previous is not None:
        for name in os.listdir(image_dir):
            if name.endswith(".png") and f"images/{name}" not in written:
                os.remove(os.path.join(image_dir, name))

    files = {}
    for name, items in ((_TRAIN, train), (_META, meta), (_TEST, test)):
        data = _json_array_bytes(items)
        with open(os.path.join(out_dir, name), "wb") as f:
            f.write(data)
        files[name] = {"sha256": _sha256(data), "records": len(items), "bytes": len(data)}
    files["images"] = {"count": len(jobs), "sha256": image_hash.hexdigest()}

    manifest = {
        "generator": __package__,
        "version": GENERATOR_VERSION,
        "seed": config.seed,
        "config": config_dict,
        "domains": domain_info,
        "quality_order": [d["name"] for d in sorted(domain_info, key=lambda d: -d["quality"])],
        "oracle_weights": {d["name"]: d["oracle_weight"] for d in domain_info},
        "counts": {"train_records": len(train), "train_chains": len(train) // NUM_STEPS, "meta_chains": len(meta),
                   "meta_true": sum(r["true_false"] for r in meta),
                   "meta_questions": len({r["question_id"] for r in meta}), "test_questions": len(test),
                   "test_candidates": len(test) * config.candidates, "images": len(jobs)},
        "test_baselines": best_of_n_baselines(test),
        "error_types": {"meta": _error_type_counts(r["error_type"] for r in meta),
                        "test": _error_type_counts(c["error_type"] for q in test for c in q["candidates"])},
        "format": {
            "steps": NUM_STEPS, "step_regex": r"Step[\s:]*(\d+)", "step_separator": STEP_SEPARATOR,
            "train_text": "input + '\\n\\n' + add", "add": "'Step 1: ...\\n' ... 'Step k: ...\\n' (sid = k, 1-based)",
            "meta_input": "question + '\\n\\n' + 'Step 1: ...\\n...Step 5: ...\\nFinal answer: X'",
            "error": "from step first_error (3..5) on, the chain states a wrong value: A zero, B a number word "
                     "out of range (ten..fifteen), C an in-range value that contradicts step 2 and the image",
            "labels": "accuracy = score / times (simulated Monte-Carlo rollouts; see domains.py)",
        },
        "files": files,
    }
    manifest_bytes = (json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    with open(os.path.join(out_dir, _MANIFEST), "wb") as f:
        f.write(manifest_bytes)
    return manifest
