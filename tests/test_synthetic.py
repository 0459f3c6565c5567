"""The synthetic benchmark: determinism, manifest, label semantics per domain, chain format, best-of-N file."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from dreamprm_jax.data import steps, synthetic
from dreamprm_jax.data.synthetic import domains as domains_mod
from dreamprm_jax.data.synthetic.tasks import BLATANT_VALUE, NUMBER_WORDS

STEP_RE = re.compile(r"Step[\s:]*(\d+)")
SMALL = dataclasses.replace(synthetic.default_config(), train_per_domain=30, meta=12, test=10)


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
    """The values a step states (chains write them as words, 'zero'..'nine')."""
    return {NUMBER_WORDS.index(w) for w in re.findall(r"[a-z]+", text) if w in NUMBER_WORDS}


def visible_first_error(chain: str) -> int | None:
    """First step (3..5) stating a number that step 2 did not state: the error as a reader sees it."""
    bodies = _step_bodies(chain)
    evidence = _numbers(bodies[1])
    for k, body in enumerate(bodies[2:], start=3):
        if not _numbers(body) <= evidence:
            return k
    return None


# ----------------------------------------------------------------------------------------
# Determinism and manifest
# ----------------------------------------------------------------------------------------

def test_same_seed_gives_byte_identical_files(bench, tmp_path):
    out, manifest, _ = bench
    manifest2 = synthetic.generate(tmp_path, SMALL)
    for name in ("train.json", "meta.json", "test_bon.json", "manifest.json"):
        assert (out / name).read_bytes() == (tmp_path / name).read_bytes(), f"{name} differs between two runs, seed 0"
    assert manifest2 == manifest
    other = synthetic.generate(tmp_path / "seed1", dataclasses.replace(SMALL, seed=1))
    assert other["files"]["train.json"]["sha256"] != manifest["files"]["train.json"]["sha256"]


def _spec_of(config, name):
    return next(d for d in config.domains if d.name == name)


def test_dropping_a_domain_leaves_the_others_unchanged():
    full, _, _ = synthetic.domain_records(_spec_of(SMALL, "clean_hard"), SMALL)
    sub = synthetic.select_domains(SMALL, ["clean_hard"])
    alone, _, _ = synthetic.domain_records(sub.domains[0], sub)
    assert full == alone


def test_manifest_contents(bench):
    out, manifest, files = bench
    assert manifest["seed"] == 0 and manifest["version"] == synthetic.GENERATOR_VERSION
    names = [d["name"] for d in manifest["domains"]]
    assert len(names) >= 6 and len(set(names)) == len(names)
    assert {"clean_easy", "label_noise", "trivial", "blank_image", "flipped"} <= set(names)
    qualities = synthetic.planted_qualities(manifest)
    assert manifest["quality_order"] == sorted(names, key=lambda n: -qualities[n])
    assert qualities["flipped"] < qualities["blank_image"] < qualities["label_noise"] \
        < qualities["clean_hard"] < qualities["clean_easy"] < qualities["trivial"]
    for d in manifest["domains"]:
        assert d["description"] and isinstance(d["corruption"], dict)
        assert d["records"] == 5 * SMALL.train_per_domain  # equal counts per domain by default
        assert sum(r["dataset"] == d["name"] for r in files["train.json"]) == d["records"]
    noisy = next(d for d in manifest["domains"] if d["name"] == "label_noise")
    assert noisy["corruption"]["label_noise"] == 0.5 and noisy["randomised_records"] == round(0.5 * noisy["records"])
    for name in ("train.json", "meta.json", "test_bon.json"):
        data = (out / name).read_bytes()
        assert manifest["files"][name]["sha256"] == hashlib.sha256(data).hexdigest(), name
        assert manifest["files"][name]["records"] == len(files[name])
    pngs = sorted(os.listdir(out / "images"))
    assert manifest["files"]["images"]["count"] == len(pngs) == manifest["counts"]["images"]
    assert manifest["counts"]["meta_true"] == SMALL.meta // 2
    assert synthetic.load_manifest(out) == manifest


def test_reuse_skips_an_intact_benchmark_and_regenerates_a_changed_one(tmp_path):
    cfg = dataclasses.replace(SMALL, domains=SMALL.domains[:1], train_per_domain=4, meta=2, test=1)
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
# Chain format
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
    assert steps.split_steps(meta_input) == train_texts
    for r in files["meta.json"]:
        assert len(steps.split_steps(r["input"])) == 5


def test_planted_error_is_visible_in_text(bench):
    _, _, files = bench
    for r in files["meta.json"]:
        chain = r["input"].split("\n\n", 1)[1]
        assert (visible_first_error(chain) is None) == r["true_false"], chain
    for q in files["test_bon.json"]:
        for c in q["candidates"]:
            first = visible_first_error(c["text"])
            expected = [1 if first is None or k < first else 0 for k in range(1, 6)]
            assert c["step_labels"] == expected, c
            assert c["correct"] == (first is None) == (c["text"].rsplit(": ", 1)[1] == q["answer"]), c


# ----------------------------------------------------------------------------------------
# Labels per domain
# ----------------------------------------------------------------------------------------

def _spec(name: str) -> synthetic.DomainSpec:
    return next(d for d in synthetic.default_domains() if d.name == name)


def _chains(records: list[dict]) -> list[list[dict]]:
    assert len(records) % 5 == 0
    return [records[i:i + 5] for i in range(0, len(records), 5)]


LARGE = dataclasses.replace(SMALL, train_per_domain=600)


@pytest.mark.parametrize("name", ["clean_easy", "clean_hard", "trivial"])
def test_clean_labels_follow_the_text(name):
    spec = _spec(name)
    records, randomised, _ = synthetic.domain_records(spec, LARGE)
    assert not randomised.any()
    clean, error = [], []
    for chain in _chains(records):
        first = visible_first_error(chain[-1]["add"] + "Final answer: 0")
        assert [r["sid"] for r in chain] == [1, 2, 3, 4, 5] and len({r["id"] for r in chain}) == 1
        for r in chain:
            assert r["accuracy"] == r["score"] / r["times"]
            bad = first is not None and r["sid"] >= first
            if r["sid"] == 5:
                assert r["score"] == (0 if bad else r["times"]), r
            else:
                (error if bad else clean).append(r["accuracy"])
    # binomial means over >= 600 prefixes: standard error < 0.02, tolerance 0.05
    assert abs(np.mean(clean) - spec.p_clean) < 0.05 and abs(np.mean(error) - spec.p_error) < 0.05
    n_error_chains = sum(visible_first_error(c[-1]["add"] + "Final answer: 0") is not None for c in _chains(records))
    assert abs(n_error_chains / LARGE.train_per_domain - spec.error_rate) < 0.1  # binomial sd 0.02


def test_flipped_swaps_the_labels_of_correct_and_erroneous_chains():
    spec = _spec("flipped")
    flipped, _, _ = synthetic.domain_records(spec, LARGE)
    clean, _, _ = synthetic.domain_records(dataclasses.replace(spec, label_flip=False), LARGE)
    assert [r["add"] for r in flipped] == [r["add"] for r in clean]
    for chain in _chains(flipped):
        first = visible_first_error(chain[-1]["add"] + "Final answer: 0")
        assert chain[-1]["score"] == (chain[-1]["times"] if first is not None else 0), chain[-1]
        # the gold answer agrees with the (flipped) label: the chain's answer iff labelled correct
        (answer,) = _numbers(_step_bodies(chain[-1]["add"])[4])
        assert (chain[-1]["ground_truth"] == str(answer)) == (chain[-1]["score"] == chain[-1]["times"]), chain[-1]
    # the label distribution is the clean one: same mean within sampling error (600 chains,
    # per-chain mean label sd ~0.3 -> standard error 0.012 each, 0.017 for the difference;
    # tolerance 0.06 = 3.5 sd; 1 - accuracy would differ by 0.4)
    assert abs(np.mean([r["accuracy"] for r in flipped]) - np.mean([r["accuracy"] for r in clean])) < 0.06
    x = [float(visible_first_error(c[-1]["add"] + "Final answer: 0") is not None) for c in _chains(flipped)]
    y = [c[-1]["accuracy"] for c in _chains(flipped)]
    assert np.corrcoef(x, y)[0, 1] > 0.95  # error chains score 1, correct ones 0: perfectly anti-clean


def test_label_noise_redraws_exactly_the_planted_fraction_from_the_domains_labels():
    spec = _spec("label_noise")
    noisy, randomised, _ = synthetic.domain_records(spec, LARGE)
    clean, _, _ = synthetic.domain_records(dataclasses.replace(spec, label_noise=0.0), LARGE)
    assert [r["add"] for r in noisy] == [r["add"] for r in clean]
    assert randomised.sum() == round(spec.label_noise * len(noisy))
    same = np.array([n["score"] == c["score"] for n, c in zip(noisy, clean)])
    assert same[~randomised].all()
    assert not same[randomised].all()
    # a permutation within each step index: the multiset of labels per step is unchanged
    for k in range(1, 6):
        assert sorted(r["score"] for r in noisy if r["sid"] == k) == sorted(r["score"] for r in clean if r["sid"] == k)


def test_default_domains_share_one_label_distribution():
    specs = synthetic.default_domains()
    assert len({(d.p_clean, d.p_error, d.error_rate, d.error_steps) for d in specs}) == 1
    expected = domains_mod.expected_mean_label(specs[0].p_clean, specs[0].p_error, specs[0].error_rate)
    by_step = {}
    for spec in specs:
        records, _, _ = synthetic.domain_records(spec, LARGE)
        acc = np.array([r["accuracy"] for r in records])  # [3000]
        sid = np.array([r["sid"] for r in records])  # [3000]
        # 600 chains, per-chain mean label sd ~0.3 -> standard error 0.012; tolerance 0.045
        assert abs(acc.mean() - expected) < 0.045, spec.name
        by_step[spec.name] = [acc[sid == k].mean() for k in range(1, 6)]
    # per step: 600 labels, sd <= 0.5 -> standard error 0.02; tolerance 0.08 between any two domains
    spread = np.ptp(np.array(list(by_step.values())), axis=0)  # [5]
    assert (spread < 0.08).all(), by_step


def test_meta_errors_are_blatant_by_default(bench):
    _, _, files = bench
    wrong = [r for r in files["meta.json"] if not r["true_false"]]
    assert wrong and all(BLATANT_VALUE in _numbers(r["input"].split("Final answer:")[0]) for r in wrong)
    right = [r for r in files["meta.json"] if r["true_false"]]
    assert not any(BLATANT_VALUE in _numbers(r["input"]) for r in right)


@pytest.mark.parametrize("name,fraction", [("clean_easy", 0.75), ("clean_hard", 0.5), ("trivial", 1.0)])
def test_blatant_fraction_of_errors(name, fraction):
    spec = _spec(name)
    records, _, _ = synthetic.domain_records(spec, LARGE)
    blatant = subtle = 0
    for chain in _chains(records):
        first = visible_first_error(chain[-1]["add"] + "Final answer: 0")
        if first is not None:
            is_blatant = BLATANT_VALUE in _numbers(_step_bodies(chain[-1]["add"])[first - 1])
            blatant += is_blatant
            subtle += not is_blatant
    # ~300 error chains: binomial sd <= 0.03; tolerance 0.1
    assert abs(blatant / (blatant + subtle) - fraction) < 0.1, (blatant, subtle)


def test_blank_image_labels_are_uncorrelated_with_the_text_and_images_are_noise(tmp_path):
    spec = _spec("blank_image")

    def text_label_corr(records):
        x = [float(visible_first_error(r["add"] + "Final answer: 0") is not None) for r in records if r["sid"] == 5]
        y = [r["accuracy"] for r in records if r["sid"] == 5]
        return float(np.corrcoef(x, y)[0, 1])

    blank, _, jobs = synthetic.domain_records(spec, LARGE)
    clean, _, _ = synthetic.domain_records(_spec("clean_easy"), LARGE)
    # 600 chains: the sample correlation of independent variables has sd ~0.04; tolerance 0.15
    assert abs(text_label_corr(blank)) < 0.15
    assert text_label_corr(clean) < -0.95
    for _, render in jobs[:3]:
        pixels = np.asarray(render(), dtype=np.float32)  # [H, W, 3]
        assert pixels.std() > 50.0  # uniform noise on 0..255 has sd 73.9; a scene is mostly white
    assert all(r["ground_truth"].isdigit() for r in blank)


def test_corrupt_scores_and_rollout_scores_are_pure_functions():
    spec = _spec("label_noise")
    scores = np.arange(10) % 9
    a = domains_mod.corrupt_scores(scores, spec, 8, np.random.default_rng(3))
    b = domains_mod.corrupt_scores(scores, spec, 8, np.random.default_rng(3))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(scores, np.arange(10) % 9)  # input untouched
    r = domains_mod.rollout_scores(4, _spec("clean_easy"), 8, np.random.default_rng(0))
    assert r.shape == (5,) and r[-1] == 0 and ((0 <= r) & (r <= 8)).all()
    with pytest.raises(ValueError, match="p_error <= p_clean"):
        synthetic.DomainSpec("bad", 0.0, "x", p_clean=0.1, p_error=0.5)


# ----------------------------------------------------------------------------------------
# Best-of-N file and CLI
# ----------------------------------------------------------------------------------------

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
    # expectations ~0.94 / 0.53 / 0.40; 400 questions -> sd < 0.03; tolerance 0.1
    assert base["oracle"] - base["majority_vote"] > 0.25 and base["majority_vote"] > base["random"]


def test_cli_writes_a_subset(tmp_path):
    from experiments import make_synthetic

    rc = make_synthetic.main(["--out", str(tmp_path), "--seed", "2", "--train-per-domain", "4", "--meta", "4",
                              "--test", "2", "--image-size", "32", "--domains", "flipped,clean_easy", "--quiet"])
    assert rc == 0
    manifest = synthetic.load_manifest(tmp_path)
    assert [d["name"] for d in manifest["domains"]] == ["flipped", "clean_easy"]
    assert manifest["seed"] == 2 and manifest["counts"]["train_records"] == 40
    with Image.open(tmp_path / json.loads((tmp_path / "meta.json").read_text())[0]["image_path"]) as img:
        assert img.size == (32, 32)
    with pytest.raises(ValueError, match="unknown domain"):
        make_synthetic.main(["--out", str(tmp_path), "--domains", "nope", "--quiet"])
