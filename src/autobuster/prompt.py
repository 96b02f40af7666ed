"""The fixed prompt, the chat messages around it, answer parsing and the format check."""
import re

# The BusterX++ prompt, verbatim (A = real, B = fake).
PROMPT = (
    "Please analyze whether there are any inconsistencies or obvious signs of forgery in the video, "
    "and finally come to a conclusion: Is this video real or fake?\n\n"
    "Please think about this question as if you were a human pondering deeply. Engage in an internal "
    "dialogue using expressions such as 'let me think', 'wait', 'Hmm', 'oh, I see', 'let's break it down', "
    "etc.\n\n"
    "Then, just answer this MCQ with a single letter:\n"
    "Q: Is this video real or fake?\n"
    "Options:\n"
    "A) real\n"
    "B) fake"
)
FORMAT_HINT = "<think>{reasoning}</think><answer>{A or B}</answer>"
MODES = ("think", "no_think")  # BusterX++'s thinking-mode switches, written as /think or /no_think
LABELS = ("real", "fake")  # index = label id; fake is the positive class
LETTERS = ("A", "B")  # A) real, B) fake

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S)
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_WORDS = {"a": "real", "real": "real", "a) real": "real", "b": "fake", "fake": "fake", "b) fake": "fake"}
# The whole reply: one think block, then one answer block with a bare letter, nothing else.
_FORMAT = re.compile(
    r"\s*<think>((?:(?!</?think>|</?answer>).)+)</think>\s*<answer>([AB])</answer>\s*", re.S
)
_NO_THINK_FORMAT = re.compile(r"\s*<answer>([AB])</answer>\s*")


def prompt_for(mode: str | None = None) -> str:
    """The fixed prompt, or with a mode the prompt and its switch on a last line. No switch is the thinking mode the
    fixed evaluation has always scored, so its numbers stay comparable with runs that never saw a switch."""
    if mode is None:
        return PROMPT
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}: use one of {', '.join(MODES)}")
    return f"{PROMPT}\n/{mode}"


def messages(prompt: str = PROMPT) -> list[dict]:
    """The chat turn for one clip: the video first, then the question (as BusterX++ feeds it)."""
    return [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": prompt}]}]


def parse_answer(reply: str) -> str:
    """'real', 'fake' or 'unclear' from the last <answer> block (or the last \\boxed{}, the 2026 form)."""
    found = _ANSWER.findall(reply) or _BOXED.findall(reply)
    if not found:
        return "unclear"
    return _WORDS.get(found[-1].strip().strip(".").lower(), "unclear")


def is_well_formed(reply: str, mode: str | None = None) -> bool:
    """True for exactly <think>...</think><answer>A|B</answer>, or <answer>A|B</answer> alone in no_think mode
    (whitespace around the blocks allowed)."""
    return (_NO_THINK_FORMAT if mode == "no_think" else _FORMAT).fullmatch(reply) is not None


def thinks(reply: str) -> bool:
    """Whether the reply opens a think block (what the /no_think switch asks the model not to do)."""
    return "<think>" in reply
