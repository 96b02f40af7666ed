"""Answer parsing and the format check of both BusterX++ editions on well-formed, short, malformed and adversarial
replies."""
import re

import pytest

from autobuster import tiny
from autobuster.prompt import ANSWER, BOXED, PROMPT, PROMPT_2026, thinks


@pytest.mark.parametrize("reply,answer", [
    ("<think>hmm</think><answer>A</answer>", "real"),
    ("<think>hmm</think><answer>B</answer>", "fake"),
    ("<answer> b </answer>", "fake"),
    ("<answer>real</answer>", "real"),
    ("<answer>Fake.</answer>", "fake"),
    ("<answer>B) fake</answer>", "fake"),
    ("<think>maybe <answer>A</answer>?</think><answer>B</answer>", "fake"),  # the last block counts
    ("<think>maybe <answer>A</answer>?</think>", "unclear"),  # only thought about
    ("the answer is \\boxed{A}", "unclear"),  # the other edition's form
    ("<answer>A or B</answer>", "unclear"),
    ("<answer>C</answer>", "unclear"),
    ("<answer></answer>", "unclear"),
    ("<answer>A", "unclear"),  # never closed
    ("A", "unclear"),
    ("", "unclear"),
    ("<answer>AB</answer>", "unclear"),
    ("<answer>real</answer><answer>maybe</answer>", "unclear"),
])
def test_parse_answer_2025(reply, answer):
    assert ANSWER.parse(reply) == answer


def test_well_formed_2025():
    assert ANSWER.well_formed("<think>a</think><answer>A</answer>")
    assert not ANSWER.well_formed("<think>a</think><answer>a</answer>")
    assert not ANSWER.well_formed("prefix <think>a</think><answer>A</answer>")


def test_prompts_are_the_busterx_mcqs():
    assert PROMPT.endswith("A) real\nB) fake") and "Is this video real or fake?" in PROMPT
    # the authors' prompts/default_user_prompt.txt holds two backslashes before "boxed" and is fed as written
    assert PROMPT_2026.endswith("B) fake\n\nPut the final answer in \\\\boxed{...}")
    assert "let me think" not in PROMPT_2026 and "Is this video real or fake?" in PROMPT_2026


def test_modes_append_the_busterx_switch_to_the_2025_prompt_and_go_to_the_2026_template():
    assert ANSWER.prompt_for() == PROMPT  # the fixed evaluation's prompt is unchanged
    assert ANSWER.prompt_for("think") == PROMPT + "\n/think"
    assert ANSWER.prompt_for("no_think") == PROMPT + "\n/no_think"
    assert ANSWER.template_kwargs("no_think") == {}
    assert BOXED.prompt_for("no_think") == BOXED.prompt_for() == PROMPT_2026
    assert BOXED.template_kwargs("no_think") == {"enable_thinking": False}
    assert BOXED.template_kwargs() == BOXED.template_kwargs("think") == {"enable_thinking": True}
    for fmt in (ANSWER, BOXED):
        with pytest.raises(ValueError):
            fmt.prompt_for("maybe")


@pytest.mark.parametrize("reply,think,no_think", [
    ("<think>a</think><answer>A</answer>", True, False),
    ("<answer>B</answer>", False, True),
    (" <answer>A</answer>\n", False, True),
    ("<answer>b</answer>", False, False),
    ("<answer>A</answer><answer>B</answer>", False, False),
    ("<answer>A</answer> because", False, False),
])
def test_well_formed_per_mode_2025(reply, think, no_think):
    assert ANSWER.well_formed(reply, "think") == ANSWER.well_formed(reply) == think
    assert ANSWER.well_formed(reply, "no_think") == no_think


EXPLAINED = "The lighting on the face flickers between frames and the hands merge with the cup, so"  # 86 chars


def authors_format_reward(completion: str) -> float:
    """The oracle: BusterX's plugins/reward_func.py `external_format`, worked out from its source, on the completion
    as ms-swift hands it over (the template's opened "<think>\\n" put back in front)."""
    m = re.compile(r"^<think>(.*?)</think>\n\n([^\s].+)$", re.DOTALL).match(completion)
    if not m:
        return -1.0
    answer = re.sub(r"<think>.*?</think>", "", completion, flags=re.DOTALL)
    if "<think>" in answer or "</think>" in answer or len(answer.strip()) < 50:
        return -1.0
    return 0.0


@pytest.mark.parametrize("reply,answer,formed", [
    (f"Let me look.\n</think>\n\n{EXPLAINED} \\boxed{{B}}", "fake", True),
    (f"Let me look.\n</think>\n\n{EXPLAINED} \\boxed{{A}}\n", "real", True),
    (f"Looks \\boxed{{A}} at first.\n</think>\n\n{EXPLAINED} \\boxed{{B}}", "fake", True),  # after the thought
    (f"hmm</think>\n\n{EXPLAINED} \\boxed{{fake}}", "fake", False),  # a word, not the letter
    ("hmm</think>\n\nIt is fake. \\boxed{B}", "fake", False),  # under 50 characters after the think block
    (f"hmm</think>\n{EXPLAINED} \\boxed{{B}}", "fake", False),  # one newline, not a blank line
    (f"hmm</think>\n\n {EXPLAINED} \\boxed{{B}}", "fake", False),  # the explanation starts with a space
    (f"</think>\n\n{EXPLAINED} \\boxed{{B}}", "fake", True),  # an empty thought (the opened block held "\n")
    (f"hmm</think>\n\n{EXPLAINED} \\boxed{{B}} and <think>more</think>", "fake", False),  # a second think block
    (f"hmm</think>\n\n{EXPLAINED} </think> \\boxed{{B}}", "fake", False),  # a stray closing tag
    (f"hmm</think>\n\n{EXPLAINED} \\boxed{{B}} or maybe not", "fake", False),  # the answer is not last
    (f"hmm</think>\n\n{EXPLAINED} \\boxed{{A}} \\boxed{{B}}", "fake", True),  # the last box counts
    (f"I think it is \\boxed{{B}} but I keep thinking {EXPLAINED}", "fake", False),  # never left the think block
    (f"hmm</think>\n\n{EXPLAINED} \\boxed{{C}}", "unclear", False),
    (f"hmm</think>\n\n{EXPLAINED} <answer>B</answer>", "unclear", False),  # the other edition's form
    ("", "unclear", False),
])
def test_2026_format_against_the_authors_reward(reply, answer, formed):
    assert BOXED.parse(reply) == answer
    assert BOXED.well_formed(reply) == formed
    # the authors' format reward agrees wherever the reply ends in a \boxed letter (theirs leaves the box to the
    # accuracy reward; ours asks for \boxed{A|B} last, as the format does)
    if re.search(r"\\boxed\{[AB]\}\s*$", reply):
        assert (authors_format_reward("<think>\n" + reply) == 0.0) == formed


@pytest.mark.parametrize("reply,no_think", [
    ("\\boxed{A}", True), (" \\boxed{B}\n", True), ("\\boxed{b}", False), ("It is \\boxed{B}", False),
    ("hmm</think>\n\n\\boxed{B}", False),
])
def test_2026_no_think_is_the_box_alone(reply, no_think):
    assert BOXED.well_formed(reply, "no_think") == no_think


def test_a_reply_thinks_if_it_opens_or_closes_a_think_block():
    assert thinks("<think>a</think><answer>A</answer>") and thinks(f"a</think>\n\n{EXPLAINED} \\boxed{{A}}")
    assert not thinks("<answer>A</answer>") and not thinks("\\boxed{A}")


@pytest.mark.parametrize("fmt", [ANSWER, BOXED])
def test_written_replies_are_well_formed_and_parse(fmt):
    for letter, label in (("A", "real"), ("B", "fake")):
        reply = fmt.write("let me think", letter, EXPLAINED)
        assert fmt.well_formed(reply) and fmt.parse(reply) == label
        assert fmt.well_formed(reply[reply.rindex(fmt.anchor):], "no_think")  # stage 2's no_think target


@pytest.mark.parametrize("fmt", [ANSWER, BOXED])
def test_the_tiny_models_warm_start_replies_are_well_formed(fmt):
    """What a tiny model learns to write before RL is a reply its format accepts (the 2026 one with its think block
    closed at once, the 50 characters after it met)."""
    for letter, label in (("A", "real"), ("B", "fake")):
        reply = tiny.warm_reply(fmt, letter)
        assert fmt.well_formed(reply) and fmt.parse(reply) == label
