"""Answer parsing and the format check on well-formed, malformed and adversarial replies."""
import pytest

from autobuster.prompt import PROMPT, is_well_formed, parse_answer


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
