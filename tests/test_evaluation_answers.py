"""Final-answer extraction and answer matching: the tricky cases."""

import pytest

from dreamprm_jax.evaluation import answers as ans

# --- extraction -------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("Step 1: x. Final answer: (B).", "(B)"),
    ("Step 1: x.\nFinal Answer: 42", "42"),
    ("final answer is 42", "42"),
    ("FINAL ANSWER - 7 cm.", "7 cm"),
    ("**Final answer:** $\\boxed{\\frac{3}{4}}$", "\\frac{3}{4}"),
    ("Final answer: \\boxed{12}", "12"),
    ("Final answer:\n\n  12 cm.\nmore text", "12 cm"),
    ("Step 1: my final answer will come. Final answer: x\nFinal answer: y", "y"),  # the last one
    ("Final answer: 3.14.", "3.14"),
    ("Step 1: no marker here", None),
    ("Final answer:   ", None),
    ("", None),
    (None, None),
])
def test_extract_final_answer(text, expected):
    assert ans.extract_final_answer(text) == expected


# --- matching ---------------------------------------------------------------------------

CHOICES = ["3 cm", "5 cm", "7.5 cm", "a right angle"]


@pytest.mark.parametrize("pred, gold, choices, expected", [
    # multiple-choice letters, every common spelling
    ("(B)", "B", CHOICES, True),
    ("B", "(B)", CHOICES, True),
    ("B.", "B", CHOICES, True),
    ("b)", "B", CHOICES, True),
    ("Answer: b", "B", CHOICES, True),
    ("The answer is (B)", "B", CHOICES, True),
    ("Option B", "B", CHOICES, True),
    ("(B) 5 cm", "B", CHOICES, True),
    ("B. 5 cm", "B", CHOICES, True),
    ("A", "B", CHOICES, False),
    ("(C)", "B", CHOICES, False),
    ("E", "A", CHOICES, False),               # a letter beyond the choices is not an option
    # option text <-> letter
    ("5 cm", "B", CHOICES, True),
    ("5", "B", CHOICES, True),                # the number names choice B uniquely
    ("5 CM.", "B", CHOICES, True),
    ("B", "5 cm", CHOICES, True),             # gold given as option text
    ("7.5 cm", "C", CHOICES, True),
    ("A right angle", "D", CHOICES, True),    # article and case ignored
    ("The answer is a right angle", "B", CHOICES, False),  # lower-case 'a' is not the letter A
    ("3 cm", "B", CHOICES, False),
    (None, "B", CHOICES, False),
    ("", "B", CHOICES, False),
    # letters without a choice list
    ("(c)", "C", None, True),
    ("Answer: D", "(D)", None, True),
    ("D", "C", None, False),
    # numbers: integers exact, decimals/fractions relative 1e-2, commas/units/$/% stripped
    ("1,234", "1234", None, True),
    ("$1,234.00", "1234", None, True),
    ("1234", "1,234", None, True),
    ("100.0", "100", None, True),
    ("101", "100", None, False),              # no relative tolerance on integer golds
    ("99.9", "100", None, False),
    ("1/3", "0.33", None, True),
    ("0.33", "1/3", None, True),
    ("0.333", "1/3", None, True),
    ("0.5", "0.46", None, False),
    ("3.1416", "3.14", None, True),
    ("2.52", "2.5", None, True),
    ("2.6", "2.5", None, False),
    ("\\frac{3}{4}", "0.75", None, True),
    ("3 / 4", "0.75", None, True),
    ("25%", "0.25", None, True),
    ("0.25", "25%", None, True),
    ("25", "25%", None, True),
    ("25\\%", "25", None, True),
    ("12 cm^2", "12", None, True),
    ("12 m/s", "12", None, True),
    ("30°", "30", None, True),
    ("30^\\circ", "30", None, True),
    ("30 degrees", "30", None, True),
    ("x = 5", "5", None, True),
    ("-3", "−3", None, True),                 # unicode minus
    ("-3", "3", None, False),
    ("two", "2", None, True),
    ("1.5e3", "1500", None, True),
    ("about 7", "7", None, True),
    ("3 apples and 4 pears", "3", None, False),
    ("0", "0", None, True),
    ("0.001", "0", None, False),
    # free text
    ("The Eiffel Tower", "eiffel tower", None, True),
    ("Yes.", "yes", None, True),
    ("no", "yes", None, False),
    ("New-York", "new york", None, True),
    ("cat", "cats", None, False),
])
def test_match_answer(pred, gold, choices, expected):
    assert ans.match_answer(pred, gold, choices=choices) is expected


def test_tolerance_is_configurable():
    strict = ans.MatchConfig(rel_tol=1e-6)
    assert ans.match_answer("0.333", "1/3") is True
    assert ans.match_answer("0.333", "1/3", config=strict) is False
    no_pct = ans.MatchConfig(percent_equivalence=False)
    assert ans.match_answer("25%", "0.25", config=no_pct) is False


def test_parse_number_and_letter():
    assert ans.parse_number("$1,234.5") == pytest.approx(1234.5, abs=1e-12)
    assert ans.parse_number("3/4") == pytest.approx(0.75, abs=1e-12)
    assert ans.parse_number("25%") == pytest.approx(25.0, abs=1e-12)
    assert ans.parse_number("1/0") is None
    assert ans.parse_number("blue") is None
    assert ans.parse_choice_letter("The correct option is c", CHOICES) == "C"
    assert ans.parse_choice_letter("7.5", CHOICES) == "C"
    assert ans.parse_choice_letter("banana", CHOICES) is None


def test_answer_key_groups_equal_answers():
    assert ans.answer_key("1/2") == ans.answer_key("0.5") == ans.answer_key("$0.50")
    assert ans.answer_key("(B)", CHOICES) == ans.answer_key("5 cm", CHOICES) == "choice:B"
    assert ans.answer_key("The Cat.") == ans.answer_key("cat")
    assert ans.answer_key(None) is None and ans.answer_key("  ") is None


def test_benchmark_matcher_override():
    calls = []

    def exact(pred, gold, choices):
        calls.append((pred, gold, choices))
        return pred == gold

    ans.register_matcher("ToyBench", exact)
    try:
        assert "toybench" in ans.registered_matchers()
        assert ans.match_answer("1,000", "1000", benchmark="toybench") is False   # override decides
        assert ans.match_answer("1,000", "1000", benchmark="OtherBench") is True  # default rules
        assert calls == [("1,000", "1000", None)]
        with pytest.raises(ValueError, match="already has a matcher"):
            ans.register_matcher("TOYBENCH", exact)
        ans.register_matcher("toybench", lambda p, g, c: True, overwrite=True)
        assert ans.match_answer("x", "y", benchmark="ToyBench") is True
    finally:
        ans.unregister_matcher("ToyBench")
    assert ans.match_answer("x", "y", benchmark="ToyBench") is False


def test_register_matcher_as_decorator():
    @ans.register_matcher("DecoBench")
    def always(pred, gold, choices):
        return True

    try:
        assert ans.get_matcher("decobench") is always
    finally:
        ans.unregister_matcher("DecoBench")
