"""Answer parsing and the format check on well-formed, malformed and adversarial replies."""
import pytest

from autobuster.prompt import PROMPT, is_well_formed, parse_answer, prompt_for


@pytest.mark.parametrize("reply,answer", [
    ("<think>hmm</think><answer>A</answer>", "real"),
    ("<think>hmm</think><answer>B</answer>", "fake"),
    ("<answer> b </answer>", "fake"),
    ("<answer>real</answer>", "real"),
    ("<answer>Fake.</answer>", "fake"),
    ("<answer>B) fake</answer>", "fake"),
    ("<think>maybe <answer>A</answer>?</think><answer>B</answer>", "fake"),  # the last block counts
    ("the answer is \\boxed{A}", "real"),  # the 2026 form
    ("<answer>A or B</answer>", "unclear"),
    ("<answer>C</answer>", "unclear"),
    ("<answer></answer>", "unclear"),
    ("<answer>A", "unclear"),  # never closed
    ("A", "unclear"),
    ("", "unclear"),
    ("<answer>AB</answer>", "unclear"),
    ("<answer>real</answer><answer>maybe</answer>", "unclear"),
])
def test_parse_answer(reply, answer):
    assert parse_answer(reply) == answer


def test_well_formed():
    assert is_well_formed("<think>a</think><answer>A</answer>")
    assert not is_well_formed("<think>a</think><answer>a</answer>")
    assert not is_well_formed("prefix <think>a</think><answer>A</answer>")


def test_prompt_is_the_busterx_mcq():
    assert PROMPT.endswith("A) real\nB) fake") and "Is this video real or fake?" in PROMPT


def test_modes_append_the_busterx_switch_to_the_one_prompt():
    assert prompt_for() == PROMPT  # the fixed evaluation's prompt is unchanged
    assert prompt_for("think") == PROMPT + "\n/think"
    assert prompt_for("no_think") == PROMPT + "\n/no_think"
    with pytest.raises(ValueError):
        prompt_for("maybe")


@pytest.mark.parametrize("reply,think,no_think", [
    ("<think>a</think><answer>A</answer>", True, False),
    ("<answer>B</answer>", False, True),
    (" <answer>A</answer>\n", False, True),
    ("<answer>b</answer>", False, False),
    ("<answer>A</answer><answer>B</answer>", False, False),
    ("<answer>A</answer> because", False, False),
])
def test_well_formed_per_mode(reply, think, no_think):
    assert is_well_formed(reply, "think") == is_well_formed(reply) == think
    assert is_well_formed(reply, "no_think") == no_think
