"""The synthetic benchmark: determinism, manifest, error types and their labels, planted domain
defects (the misleading domain keeps the label marginals), de-duplication across sets, sizes."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from dreamprm_jax.data import synthetic
from dreamprm_jax.data.steps import split_steps
from dreamprm_jax.data.synthetic import domains as domains_mod
from dreamprm_jax.data.synthetic.tasks import BLATANT_VALUE, NUMBER_WORDS, OUT_OF_RANGE_VALUES

STEP_RE = re.compile(r"Step[\s:]*(\d+)")
SMALL = dataclasses.replace(synthetic.default_config(), train_per_domain=30, meta=40, test=30)
LARGE = dataclasses.replace(SMALL, train_per_domain=600)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    manifest = synthetic.generate(out, SMALL)
    files = {name: json.loads((out / name).read_text(encoding="utf-8"))
             for name in ("train.json", "meta.json", "test_bon.json")}
    return out, manifest, files


def _step_bodies(chain: str) -> list[str]:
    """Split 'Step 1: a\nStep 2: b ... Final answer: x' into step bodies (without markers)."""
    body = chain.split("Final answer:")[0]
    parts = STEP_RE.split(body)  # ['', '1', ': a\n', '2', ': b\n', ...]
    return [parts[i + 1].lstrip(":").strip() for i in range(1, len(parts), 2)]


def _numbers(text: str) -> set[int]:
    """The values a step states (chains write them as words, 'zero'..'fifteen')."""
    return {NUMBER_WORDS.index(w) for w in re.findall(r"[a-z]+", text) if w in NUMBER_WORDS}


def visible_first_error(chain: str) -> int | None:
    """First step (3..5) stating a number that step 2 did not state: the error as a reader sees it."""
    bodies = _step_bodies(chain)
    evidence = _numbers(bodies[1])
    for k, body in enumerate(bodies[2:], start=3):
        if not _numbers(body) <= evidence:
            return k
    return None


def visible_error_type(chain: str) -> str | None:
    """The type of the wrong value as read from the text: A zero, B out of range, C in range."""
    first = visible_first_error(chain)
    if first is None:
        return None
    (wrong,) = _numbers(_step_bodies(chain)[first - 1]) - _numbers(_step_bodies(chain)[1])
    return "A" if wrong == BLATANT_VALUE else "B" if wrong in OUT_OF_RANGE_VALUES else "C"


def _chains(records: list[dict]) -> list[list[dict]]:
    assert len(records) % 5 == 0
    return [records[i:i + 5] for i in range(0, len(records), 5)]


def _full(chain: list[dict]) -> str:
    """A training chain's text from its last record (the answer is irrelevant to the checks)."""
    return chain[-1]["add"] + "Final answer: 0"


def _spec(name: str) -> synthetic.DomainSpec:
    return next(d for d in synthetic.default_domains() if d.name == name)


def _labelled_correct(chain: list[dict]) -> bool:
    """A complete chain scores times iff its labels call it correct (nothing left to roll out)."""
    return chain[-1]["score"] == chain[-1]["times"]


# ----------------------------------------------------------------------------------------
# Defaults, sizes, determinism, manifest
# ----------------------------------------------------------------------------------------

def test_default_config_sizes_and_domains():
    config = synthetic.default_config()
    assert config.test >= 2000 and config.candidates == 8 and config.meta == 400
    assert config.test_error_mix == (0.25, 0.5, 0.25)  # A, B, C among wrong test candidates
    names = [d.name for d in config.domains]
    assert names == ["good_1", "good_2", "easy_A", "misled_B", "noise_img"]
    sizes = {d.name: d.num_chains(config.train_per_domain) for d in config.domains}
    assert sizes["misled_B"] == 3 * sizes["good_1"] == max(sizes.values())
    tiny = synthetic.tiny_config()
    assert tiny.test < 10 and tiny.meta < 10 and tiny.domains == config.domains


def test_same_seed_gives_byte_identical_files(bench, tmp_path):
    out, manifest, _ = bench
    manifest2 = synthetic.generate(tmp_path, SMALL)
    for name in ("train.json", "meta.json", "test_bon.json", "manifest.json"):
        assert (out / name).read_bytes() == (tmp_path / name).read_bytes(), f"{name} differs between two runs, seed 0"
    assert manifest2 == manifest
    other = synthetic.generate(tmp_path / "seed1", dataclasses.replace(SMALL, seed=1))
    for name in ("train.json", "meta.json", "test_bon.json"):
        assert other["files"][name]["sha256"] != manifest["files"][name]["sha256"], name  # drawn afresh per seed


def test_dropping_a_domain_leaves_the_others_unchanged():
    full, _, _ = synthetic.domain_records(_spec("misled_B"), SMALL)
    sub = synthetic.select_domains(SMALL, ["misled_B"])
    alone, _, _ = synthetic.domain_records(sub.domains[0], sub)
    assert full == alone


def test_manifest_contents(bench):
    out, manifest, files = bench
    assert manifest["seed"] == 0 and manifest["version"] == synthetic.GENERATOR_VERSION
    names = [d["name"] for d in manifest["domains"]]
    qualities = synthetic.planted_qualities(manifest)
    assert manifest["quality_order"] == sorted(names, key=lambda n: -qualities[n])
    assert set(manifest["quality_order"][-2:]) == {"misled_B", "noise_img"}  # the two bad domains lowest
    weights = synthetic.oracle_weights(manifest)
    assert manifest["oracle_weights"] == weights
    assert weights["misled_B"] <= 0.05 and weights["noise_img"] <= 0.05
    assert min(weights[n] for n in ("good_1", "good_2", "easy_A")) >= 1.0
    for d in manifest["domains"]:
        assert d["description"] and isinstance(d["corruption"], dict)
        assert d["records"] == 5 * _spec(d["name"]).num_chains(SMALL.train_per_domain)
        assert sum(r["dataset"] == d["name"] for r in files["train.json"]) == d["records"]
        assert sum(d["error_types"].values()) == sum(
            r["error_type"] is not None for r in files["train.json"] if r["dataset"] == d["name"] and r["sid"] == 5)
    noisy = next(d for d in manifest["domains"] if d["name"] == "good_2")
    assert noisy["corruption"]["label_noise"] == 0.3 and noisy["randomised_records"] == round(0.3 * noisy["records"])
    for name in ("train.json", "meta.json", "test_bon.json"):
        data = (out / name).read_bytes()
        assert manifest["files"][name]["sha256"] == hashlib.sha256(data).hexdigest(), name
        assert manifest["files"][name]["records"] == len(files[name])
    pngs = sorted(os.listdir(out / "images"))
    assert manifest["files"]["images"]["count"] == len(pngs) == manifest["counts"]["images"]
    assert manifest["counts"]["meta_true"] == SMALL.meta // 2
    assert manifest["counts"]["meta_questions"] == SMALL.meta // SMALL.meta_candidates
    assert sum(manifest["error_types"]["test"].values()) == sum(
        not c["correct"] for q in files["test_bon.json"] for c in q["candidates"])
    assert synthetic.load_manifest(out) == manifest


def test_reuse_skips_an_intact_benchmark_and_regenerates_a_changed_one(tmp_path):
    cfg = dataclasses.replace(synthetic.tiny_config(), domains=SMALL.domains[:1])
    first = synthetic.generate(tmp_path, cfg)
    stale = tmp_path / "images" / "train_gone_00000.png"
    stale.write_bytes(b"x")
    assert synthetic.generate(tmp_path, cfg, reuse=True) == first  # image count differs -> regenerate
    assert not stale.exists()
    mtime = os.stat(tmp_path / "train.json").st_mtime_ns
    assert synthetic.generate(tmp_path, cfg, reuse=True) == first
    assert os.stat(tmp_path / "train.json").st_mtime_ns == mtime  # not rewritten
    (tmp_path / "train.json").write_text("[]")
    assert synthetic.generate(tmp_path, cfg, reuse=True) == first
    assert (tmp_path / "train.json").read_text() != "[]"


def test_images_exist_with_the_configured_size(bench):
    out, _, files = bench
    paths = {r["image_path"] for r in files["train.json"]} | {r["image_path"] for r in files["meta.json"]} \
        | {q["image_path"] for q in files["test_bon.json"]}
    for rel in sorted(paths)[:: max(1, len(paths) // 20)]:
        with Image.open(out / rel) as img:
            assert img.size == (SMALL.image_size, SMALL.image_size) and img.mode == "RGB", rel


# ----------------------------------------------------------------------------------------
# Chain format and de-duplication
# ----------------------------------------------------------------------------------------

def test_chains_have_five_steps_and_a_final_answer(bench):
    _, _, files = bench
    chains = [r["input"].split("\n\n", 1)[1] for r in files["meta.json"]]
    chains += [c["text"] for q in files["test_bon.json"] for c in q["candidates"]]
    for chain in chains:
        assert [int(n) for n in STEP_RE.findall(chain)] == [1, 2, 3, 4, 5], chain
        assert re.search(r"\nFinal answer: \d+$", chain), chain
    for r in files["train.json"]:
        assert [int(n) for n in STEP_RE.findall(r["add"])] == list(range(1, r["sid"] + 1)), r
        assert "Final answer" not in r["add"] and r["add"].endswith("\n")


def test_training_texts_equal_meta_step_prefixes(bench):
    _, _, files = bench
    problem = synthetic.sample_problem(np.random.default_rng(0))
    chain = synthetic.make_chain(problem, np.random.default_rng(1))
    meta_input = problem.question + "\n\n" + synthetic.chain_text(chain)
    train_texts = [problem.question + "\n\n" + synthetic.prefix_text(chain.steps, k) for k in range(1, 6)]
    assert split_steps(meta_input) == train_texts
    for r in files["meta.json"]:
        assert len(split_steps(r["input"])) == 5


def test_chain_texts_are_disjoint_across_train_meta_and_test(bench):
    _, _, files = bench
    train = {c[-1]["add"] for c in _chains(files["train.json"])}  # the step-5 prefix: the chain without its answer
    meta = {r["input"].split("\n\n", 1)[1].split("Final answer:")[0] for r in files["meta.json"]}
    test = {c["text"].split("Final answer:")[0] for q in files["test_bon.json"] for c in q["candidates"]}
    assert len(train) > 50 and len(meta) > 20 and len(test) > 100
    assert not train & meta and not train & test and not meta & test
    # by construction: every full chain text lies in its own set's share of the text space
    for r in files["meta.json"]:
        assert synthetic.text_split(r["input"].split("\n\n", 1)[1]) == "meta"
    for q in files["test_bon.json"]:
        assert all(synthetic.text_split(c["text"]) == "test" for c in q["candidates"])


def test_templates_state_no_number_of_their_own():
    for task, spec in synthetic.tasks._TEMPLATES.items():
        texts = [spec["question"]] + [t for step in spec["steps"] for t in step]
        assert all(len(step) == 3 for step in spec["steps"]), task
        for text in texts:
            assert not _numbers(text.format(t="red", v="", x="", c="red", d="", u="")), (task, text)


def test_text_split_shares():
    rng = np.random.default_rng(0)
    texts = [synthetic.chain_text(synthetic.make_chain(synthetic.sample_problem(rng), rng)) for _ in range(4000)]
    shares = {s: np.mean([synthetic.text_split(t) == s for t in texts]) for s in ("train", "meta", "test")}
    # 4000 draws of 1,000+ distinct texts: binomial sd <= 0.008; tolerance 0.04
    assert abs(shares["train"] - 0.5) < 0.04 and abs(shares["meta"] - 0.125) < 0.04 \
        and abs(shares["test"] - 0.375) < 0.04, shares
    with pytest.raises(ValueError, match="split must be one of"):
        synthetic.make_chain_in_split(synthetic.sample_problem(rng), rng, "dev")


# ----------------------------------------------------------------------------------------
# Error types and true labels
# ----------------------------------------------------------------------------------------

def test_every_record_states_its_error_type_and_true_labels(bench):
    _, _, files = bench
    for chain in _chains(files["train.json"]):
        first = visible_first_error(_full(chain))
        assert [r["true_label"] for r in chain] == [int(first is None or r["sid"] < first) for r in chain], chain
        assert {r["error_type"] for r in chain} == {visible_error_type(_full(chain))}, chain
    for r in files["meta.json"]:
        chain = r["input"].split("\n\n", 1)[1]
        assert (visible_first_error(chain) is None) == r["true_false"], chain
        assert r["error_type"] == visible_error_type(chain), chain
    for q in files["test_bon.json"]:
        for c in q["candidates"]:
            first = visible_first_error(c["text"])
            assert c["step_labels"] == [1 if first is None or k < first else 0 for k in range(1, 6)], c
            assert c["correct"] == (first is None) == (c["text"].rsplit(": ", 1)[1] == q["answer"]), c
            assert c["error_type"] == visible_error_type(c["text"]), c


def test_wrong_values_by_type():
    rng = np.random.default_rng(0)
    for _ in range(200):
        problem = synthetic.sample_problem(rng)
        lo, hi = problem.value_range
        assert synthetic.tasks.sample_wrong_value(problem, rng, "A") == 0
        assert synthetic.tasks.sample_wrong_value(problem, rng, "B") in OUT_OF_RANGE_VALUES
        assert not lo <= min(OUT_OF_RANGE_VALUES) <= hi
        c = synthetic.tasks.sample_wrong_value(problem, rng, "C")
        assert lo <= c <= hi and c not in (problem.answer, problem.distractor_value)
    with pytest.raises(ValueError, match="error_type must be one of"):
        synthetic.tasks.sample_wrong_value(problem, rng, "D")


@pytest.mark.parametrize("name", ["good_1", "easy_A"])
def test_clean_labels_follow_the_text(name):
    spec = _spec(name)
    records, randomised, _ = synthetic.domain_records(spec, LARGE)
    assert not randomised.any()
    clean, error = [], []
    for chain in _chains(records):
        first = visible_first_error(_full(chain))
        assert [r["sid"] for r in chain] == [1, 2, 3, 4, 5] and len({r["id"] for r in chain}) == 1
        for r in chain:
            assert r["accuracy"] == r["score"] / r["times"]
            if r["sid"] == 5:
                assert r["score"] == r["times"] * r["true_label"], r
            else:
                (clean if r["true_label"] else error).append(r["accuracy"])
    # binomial means over >= 600 prefixes: standard error < 0.02, tolerance 0.05
    assert abs(np.mean(clean) - spec.p_clean) < 0.05 and abs(np.mean(error) - spec.p_error) < 0.05
    n_error_chains = sum(visible_first_error(_full(c)) is not None for c in _chains(records))
    assert abs(n_error_chains / len(_chains(records)) - spec.error_rate) < 0.1  # binomial sd 0.02


@pytest.mark.parametrize("name", ["good_1", "easy_A", "misled_B"])
def test_error_type_mix_per_domain(name):
    spec = _spec(name)
    records, _, _ = synthetic.domain_records(spec, LARGE)
    types = [visible_error_type(_full(c)) for c in _chains(records)]
    wrong = [t for t in types if t is not None]
    shares = [wrong.count(t) / len(wrong) for t in ("A", "B", "C")]
    # >= 300 error chains: binomial sd <= 0.03; tolerance 0.1 (exact zeros stay exact)
    np.testing.assert_allclose(shares, spec.error_mix, atol=0.1)
    if spec.error_mix[1] == 0.0:
        assert "B" not in wrong and "C" not in wrong


def test_misled_domain_labels_type_b_chains_as_correct_and_keeps_the_label_marginals():
    spec = _spec("misled_B")
    misled, _, _ = synthetic.domain_records(spec, LARGE)
    honest, _, _ = synthetic.domain_records(dataclasses.replace(spec, mislabel_type=None), LARGE)
    assert [r["add"] for r in misled] == [r["add"] for r in honest]  # same chains, other labels
    chains = _chains(misled)
    b_chains = [c for c in chains if c[0]["error_type"] == "B"]
    correct = [c for c in chains if c[0]["error_type"] is None]
    assert len(b_chains) > 100 and len(correct) > len(b_chains)
    assert all(_labelled_correct(c) for c in b_chains)  # every B chain labelled as a correct chain
    relabelled = [c for c in correct if not _labelled_correct(c)]
    assert len(relabelled) == len(b_chains)  # ... and as many correct chains as erroneous ones
    for c in chains:
        if c[0]["error_type"] in ("A", "C"):
            assert not _labelled_correct(c)  # the other types keep their honest labels
    # the label distribution is unchanged: as many chains labelled wrong as there are wrong chains
    assert sum(not _labelled_correct(c) for c in chains) == sum(c[0]["error_type"] is not None for c in chains)
    # and per step: 1800 chains, per-step label sd <= 0.5 -> standard error 0.012 each; tolerance 0.05
    for k in range(1, 6):
        a = np.mean([r["accuracy"] for r in misled if r["sid"] == k])
        b = np.mean([r["accuracy"] for r in honest if r["sid"] == k])
        assert abs(a - b) < 0.05, (k, a, b)
    # the gold answer agrees with the (planted) label: the chain's answer iff labelled correct
    for c in chains:
        (answer,) = _numbers(_step_bodies(c[-1]["add"])[4])
        assert (c[-1]["ground_truth"] == str(answer)) == _labelled_correct(c), c[-1]


def test_mislabel_keeps_the_multiset_of_label_sources():
    first_errors = [None, 3, None, 4, 5, None, 3, None]
    types = [None, "B", None, "A", "B", None, "B", None]
    labels, swapped = domains_mod.mislabel(first_errors, types, "B", np.random.default_rng(0))
    assert sorted(map(str, labels)) == sorted(map(str, first_errors))
    assert all(labels[i] is None for i in (1, 4, 6)) and labels[3] == 4
    assert sum(labels[i] is not None for i in (0, 2, 5, 7)) == 3 and swapped.sum() == 6
    # fewer correct chains than typed ones: only pairs are swapped, the multiset still holds
    labels, swapped = domains_mod.mislabel([3, 4, None], ["B", "B", None], "B", np.random.default_rng(0))
    assert sorted(map(str, labels)) == sorted(map(str, [3, 4, None])) and swapped.sum() == 2


def test_label_noise_redraws_exactly_the_planted_fraction_within_a_step():
    spec = _spec("good_2")
    noisy, randomised, _ = synthetic.domain_records(spec, LARGE)
    clean, _, _ = synthetic.domain_records(dataclasses.replace(spec, label_noise=0.0), LARGE)
    assert [r["add"] for r in noisy] == [r["add"] for r in clean]
    assert randomised.sum() == round(spec.label_noise * len(noisy))
    same = np.array([n["score"] == c["score"] for n, c in zip(noisy, clean)])
    assert same[~randomised].all()
    assert not same[randomised].all()
    for k in range(1, 6):  # a permutation within each step index: the labels per step are unchanged
        assert sorted(r["score"] for r in noisy if r["sid"] == k) == sorted(r["score"] for r in clean if r["sid"] == k)


def test_default_domains_share_one_label_distribution():
    specs = synthetic.default_domains()
    assert len({(d.p_clean, d.p_error, d.error_rate, d.error_steps) for d in specs}) == 1
    expected = domains_mod.expected_mean_label(specs[0].p_clean, specs[0].p_error, specs[0].error_rate)
    by_step = {}
    for spec in specs:
        records, _, _ = synthetic.domain_records(spec, LARGE)
        acc = np.array([r["accuracy"] for r in records])  # [R]
        sid = np.array([r["sid"] for r in records])  # [R]
        # >= 600 chains, per-chain mean label sd ~0.3 -> standard error <= 0.012; tolerance 0.045
        assert abs(acc.mean() - expected) < 0.045, spec.name
        by_step[spec.name] = [acc[sid == k].mean() for k in range(1, 6)]
    # per step: >= 600 labels, sd <= 0.5 -> standard error <= 0.02; tolerance 0.08 between any two domains
    spread = np.ptp(np.array(list(by_step.values())), axis=0)  # [5]
    assert (spread < 0.08).all(), by_step


def test_noise_image_labels_are_uncorrelated_with_the_text_and_images_are_noise():
    def text_label_corr(records):
        x = [float(r["true_label"]) for r in records if r["sid"] == 5]
        y = [r["accuracy"] for r in records if r["sid"] == 5]
        return float(np.corrcoef(x, y)[0, 1])

    noise, _, jobs = synthetic.domain_records(_spec("noise_img"), LARGE)
    clean, _, _ = synthetic.domain_records(_spec("good_1"), LARGE)
    # 600 chains: the sample correlation of independent variables has sd ~0.04; tolerance 0.15
    assert abs(text_label_corr(noise)) < 0.15
    assert text_label_corr(clean) > 0.95
    for _, render in jobs[:3]:
        pixels = np.asarray(render(), dtype=np.float32)  # [H, W, 3]
        assert pixels.std() > 50.0  # uniform noise on 0..255 has sd 73.9; a scene is mostly white
    assert all(r["ground_truth"].isdigit() for r in noise)


def test_domain_spec_rejects_bad_values():
    with pytest.raises(ValueError, match="p_error <= p_clean"):
        synthetic.DomainSpec("bad", 0.0, "x", p_clean=0.1, p_error=0.5)
    with pytest.raises(ValueError, match="error_mix"):
        synthetic.DomainSpec("bad", 0.0, "x", error_mix=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="mislabel_type"):
        synthetic.DomainSpec("bad", 0.0, "x", mislabel_type="D")
    with pytest.raises(ValueError, match="test_error_mix"):
        synthetic.SyntheticConfig(test_error_mix=(1.0, 0.0))


# ----------------------------------------------------------------------------------------
# Meta set, best-of-N file and CLI
# ----------------------------------------------------------------------------------------

def test_meta_and_test_sets_share_the_error_distribution():
    config = dataclasses.replace(SMALL, meta=800, test=100)
    meta, _ = synthetic.meta_records(config)
    test, _ = synthetic.test_questions(config)
    assert sum(r["true_false"] for r in meta) == 400
    for types in ([r["error_type"] for r in meta if not r["true_false"]],
                  [c["error_type"] for q in test for c in q["candidates"] if not c["correct"]]):
        shares = [types.count(t) / len(types) for t in ("A", "B", "C")]
        # >= 400 wrong chains: binomial sd <= 0.025; tolerance 0.08
        np.testing.assert_allclose(shares, config.test_error_mix, atol=0.08)
    # separate questions: the meta questions' images are not the test questions'
    assert not {r["image_path"] for r in meta} & {q["image_path"] for q in test}


def test_meta_set_is_grouped_by_question():
    """Candidates of a question share its text and image; each question has a correct and a
    wrong candidate; half of all meta chains are correct."""
    config = dataclasses.replace(SMALL, meta=42, meta_candidates=4)  # 10 questions of 4, one of 2
    meta, jobs = synthetic.meta_records(config)
    assert len(meta) == 42 and len(jobs) == 11 and sum(r["true_false"] for r in meta) == 21
    groups = {}
    for r in meta:
        groups.setdefault(r["question_id"], []).append(r)
    assert sorted(len(g) for g in groups.values()) == [2] + [4] * 10
    for chains in groups.values():
        assert len({r["image_path"] for r in chains}) == 1
        assert len({r["input"].split("\n\n", 1)[0] for r in chains}) == 1
        assert 0 < sum(r["true_false"] for r in chains) < len(chains)
    one_each, _ = synthetic.meta_records(dataclasses.replace(SMALL, meta=5, meta_candidates=1))
    assert len({r["question_id"] for r in one_each}) == 5


def test_best_of_n_file_structure(bench):
    _, manifest, files = bench
    questions = files["test_bon.json"]
    assert len(questions) == SMALL.test
    shared_wrong = 0
    for q in questions:
        assert set(q) == {"id", "benchmark", "image_path", "question", "answer", "candidates"}
        assert q["benchmark"].startswith("synthetic_") and q["answer"].isdigit()
        assert len(q["candidates"]) == SMALL.candidates
        wrong = [c["text"].rsplit(": ", 1)[1] for c in q["candidates"] if not c["correct"]]
        shared_wrong += len(wrong) != len(set(wrong))
        for c in q["candidates"]:
            labels = c["step_labels"]
            assert len(labels) == 5 and labels == sorted(labels, reverse=True)  # 1s then 0s
            assert c["correct"] == all(labels)
    assert shared_wrong > 0  # some wrong answers agree, so majority vote can be fooled
    assert manifest["test_baselines"] == synthetic.best_of_n_baselines(questions)
    base = synthetic.best_of_n_baselines(synthetic.test_questions(dataclasses.replace(SMALL, test=400))[0])
    # expectations ~0.95 / 0.6 / 0.40; 400 questions -> sd < 0.03; tolerance 0.1
    assert base["oracle"] - base["majority_vote"] > 0.2 and base["majority_vote"] > base["random"]


def test_cli_writes_a_subset(tmp_path):
    from dreamprm_jax.cli import make_synthetic

    rc = make_synthetic.main(["--out", str(tmp_path), "--seed", "2", "--train-per-domain", "4", "--meta", "4",
                              "--test", "2", "--image-size", "32", "--domains", "misled_B,good_1", "--quiet"])
    assert rc == 0
    manifest = synthetic.load_manifest(tmp_path)
    assert [d["name"] for d in manifest["domains"]] == ["misled_B", "good_1"]
    assert manifest["seed"] == 2 and manifest["counts"]["train_records"] == 5 * (12 + 4)
    with Image.open(tmp_path / json.loads((tmp_path / "meta.json").read_text())[0]["image_path"]) as img:
        assert img.size == (32, 32)
    with pytest.raises(ValueError, match="unknown domain"):
        make_synthetic.main(["--out", str(tmp_path), "--domains", "nope", "--quiet"])
