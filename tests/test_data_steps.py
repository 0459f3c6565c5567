"""Step splitting: reference semantics, and the documented strict-mode deviations."""

import pytest

from dreamprm_jax.data.steps import StepError, find_max_step, split_step_reference, split_steps

CHAIN = "Q: what is 2+3?\nStep 1: read. Step 2: add 2 and 3. Step 3: check. Final answer: 5"


def test_prefixes_match_reference_on_well_formed_chain():
    strict = split_steps(CHAIN)
    reference = split_steps(CHAIN, mode="reference")
    assert strict == reference
    assert len(strict) == 3 == find_max_step(CHAIN)
    assert strict[0] == "Q: what is 2+3?\nStep 1: read. "
    assert strict[1] == "Q: what is 2+3?\nStep 1: read. Step 2: add 2 and 3. "
    assert strict[2] == "Q: what is 2+3?\nStep 1: read. Step 2: add 2 and 3. Step 3: check. "
    # every prefix extends the previous one
    assert all(b.startswith(a) for a, b in zip(strict, strict[1:]))


def test_count_regex_variants():
    assert find_max_step("step1: a STEP: 2 b Step 3 c") == 3
    assert find_max_step("no steps here") == 0


def test_case_insensitive_split_deviation():
    text = "Q? step 1: a. step 2: b. Final answer: c"
    # reference: counts 2 steps, but 'Step 2' (case-sensitive) is absent -> ''
    assert split_steps(text, mode="reference") == ["", ""]
    assert split_steps(text) == ["Q? step 1: a. ", "Q? step 1: a. step 2: b. "]


def test_digit_boundary_deviation():
    steps = " ".join(f"Step {i}: s{i}." for i in range(1, 13))
    text = "Q " + steps + " Final answer: x"
    prefixes = split_steps(text)
    assert len(prefixes) == 12
    # Step 1's prefix must stop before "Step 2", not inside "Step 12"/"Step 10"
    assert prefixes[0] == "Q Step 1: s1. "
    assert prefixes[0].count("Step") == 1
    # the reference's substring test finds "Step 2" at the same place here (first occurrence)
    assert split_step_reference(1, text) == prefixes[0]


def test_missing_final_answer_gives_whole_chain():
    text = "Q Step 1: a. Step 2: b."
    assert split_steps(text)[-1] == text
    assert split_steps(text, mode="reference")[-1] == ""


@pytest.mark.parametrize("text", ["no steps at all", "Q Step 1: a Step 3: c Final answer: d", "Step 0: a"])
def test_bad_chains_raise(text):
    with pytest.raises(StepError):
        split_steps(text)


def test_final_answer_before_last_step_raises():
    with pytest.raises(StepError, match="empty prefix"):
        split_steps("Q Step 1: a. Final answer: b. Step 2: c")


def test_bad_mode():
    with pytest.raises(ValueError, match="mode"):
        split_steps(CHAIN, mode="fuzzy")


# ----------------------------------------------------------------------------- DreamPRM's released meta format


def released_chain(steps: int, header: str | None, question_only: bool = False) -> str:
    """A chain shaped like DreamPRM's released meta records: a question with options, '### Step k:'
    headed steps, optionally a final-answer header with reasoning under it, then 'Final answer: X'."""
    text = "Question: Which option is right?\nOptions: (A) True (B) False\nLet's think step by step."
    if question_only:
        return text
    for k in range(1, steps + 1):
        text += f"\n\n### Step {k}: Part {k}\n   - reasoning of part {k}."
    if header is not None:
        text += f"\n\n{header}\nBased on the reasoning above, the answer is option (A)."
    return text + "\n\nFinal answer: A"


@pytest.mark.parametrize("header", [None, "### Final Answer", "### Final Answer:", "### FINAL ANSWER",
                                    "**final answer**"])
def test_released_format_matches_the_reference_rule(header):
    """The reference rule: prefix k < S is the text before the first 'Step k+1' (as written);
    the last prefix is the text before the first 'Final answer' as written, so a
    differently-cased final-answer header and the reasoning under it stay in the last step."""
    text = released_chain(5, header)
    strict = split_steps(text)
    assert strict == split_steps(text, mode="reference")
    assert strict[-1] == text[: text.index("Final answer:")]
    if header is not None:
        assert strict[-1].rstrip().endswith("the answer is option (A).")  # the header's reasoning is kept


def test_released_question_only_records_have_no_steps():
    text = released_chain(0, None, question_only=True)  # 'step by step' carries no number
    assert split_steps(text, mode="reference") == []
    with pytest.raises(StepError, match="no 'Step <n>' marker"):
        split_steps(text)
