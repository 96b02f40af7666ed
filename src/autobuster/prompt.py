"""The fixed prompt and answer format of each BusterX++ edition, the chat messages around it, answer parsing and the
format check. A prepared setup scores every reply in its model family's format (families.py)."""
import re
from dataclasses import dataclass

# The BusterX++ 2025 prompt (Qwen2.5-VL), verbatim (A = real, B = fake).
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
# The 2026 prompt (Qwen3.5; the authors' prompts/default_user_prompt.txt without its <video> line, which the chat
# turn's video replaces). The file holds two backslashes before "boxed", and the authors never unescape it.
PROMPT_2026 = (
    "Please analyze whether there are any inconsistencies or obvious signs of forgery in the video, "
    "and finally come to a conclusion: Is this video real or fake?\n\n"
    "Then, just answer this MCQ with a single letter:\n"
    "Q: Is this video real or fake?\n"
    "Options:\n"
    "A) real\n"
    "B) fake\n\n"
    "Put the final answer in \\\\boxed{...}"
)
MODES = ("think", "no_think")  # BusterX++'s thinking modes
LABELS = ("real", "fake")  # index = label id; fake is the positive class
LETTERS = ("A", "B")  # A) real, B) fake

_WORDS = {"a": "real", "real": "real", "a) real": "real", "b": "fake", "fake": "fake", "b) fake": "fake"}
_THINK_TAG = re.compile(r"</?think>")
_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.S)


@dataclass(frozen=True)
class Format:
    """One edition's prompt and reply format. `answer` finds the answers (the last one counts); `reply` and
    `bare_reply` match a well-formed reply in think and no_think mode; `anchor` is the text written right before
    the answer letter, where P(fake) is read."""
    name: str
    prompt: str
    answer: re.Pattern
    reply: re.Pattern
    bare_reply: re.Pattern
    anchor: str
    switch_line: bool  # modes are a /think or /no_think line under the prompt (else the template's enable_thinking)
    template: str  # a well-formed think-mode reply with {thought}, {conclusion} and {letter} in it
    opened: str = ""  # what the chat template's assistant turn already wrote of the reply (Qwen3.5: "<think>\n")
    min_conclusion: int = 0  # characters the reply must write after its think block
    described: str = ""  # the reply, as a model card says it

    def prompt_for(self, mode: str | None = None) -> str:
        """The fixed prompt, with the mode's switch line where this format has one. No mode is the thinking mode
        the fixed evaluation has always scored, so its numbers stay comparable with runs that never saw a switch."""
        if mode is not None and mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}: use one of {', '.join(MODES)}")
        return f"{self.prompt}\n/{mode}" if mode and self.switch_line else self.prompt

    def template_kwargs(self, mode: str | None = None) -> dict:
        """What the chat template needs for `mode`: Qwen3.5's closes the think block itself without thinking."""
        return {} if self.switch_line else {"enable_thinking": mode != "no_think"}

    def parse(self, reply: str) -> str:
        """'real', 'fake' or 'unclear' from the last answer outside the think blocks (an answer only thought about
        does not count; as the authors' parser, which sees the opened block too)."""
        found = self.answer.findall(_THINK_BLOCK.sub("", self.opened + reply))
        return _WORDS.get(found[-1].strip().strip(".").lower(), "unclear") if found else "unclear"

    def well_formed(self, reply: str, mode: str | None = None) -> bool:
        if mode == "no_think":
            return self.bare_reply.fullmatch(reply) is not None
        m = self.reply.fullmatch(reply)
        return m is not None and len((m.groupdict().get("conclusion") or "").strip()) >= self.min_conclusion

    def write(self, thought: str, letter: str, conclusion: str = "") -> str:
        """A well-formed think-mode reply (the tiny models' warm start)."""
        return self.template.format(thought=thought, letter=letter, conclusion=conclusion)


# 2025, Qwen2.5-VL: <think>...</think><answer>A|B</answer>, nothing else (whitespace around the blocks allowed).
ANSWER = Format(
    "answer", PROMPT, answer=re.compile(r"<answer>(.*?)</answer>", re.S),
    reply=re.compile(r"\s*<think>(?:(?!</?think>|</?answer>).)+</think>\s*<answer>[AB]</answer>\s*", re.S),
    bare_reply=re.compile(r"\s*<answer>[AB]</answer>\s*"), anchor="<answer>", switch_line=True,
    template="<think>{thought}</think><answer>{letter}</answer>",
    described="`<think>...</think><answer>A|B</answer>`")
# 2026, Qwen3.5: the template opens the think block (the reply starts inside it), so a reply is the thought,
# </think>, a blank line, then at least 50 characters ending in \boxed{A|B} (the authors' format reward; they add
# the opened <think> back before matching). Without thinking the template writes the empty think block.
BOXED = Format(
    "boxed", PROMPT_2026, answer=re.compile(r"\\boxed\{([^{}]*)\}"),
    reply=re.compile(r"(?:(?!</?think>).)*</think>\n\n(?P<conclusion>\S(?:(?!</?think>).)*\\boxed\{[AB]\})\s*",
                     re.S),
    bare_reply=re.compile(r"\s*\\boxed\{[AB]\}\s*"), anchor="\\boxed{", switch_line=False,
    template="{thought}</think>\n\n{conclusion} \\boxed{{{letter}}}", opened="<think>\n",
    min_conclusion=50, described="its thought (the chat template opens `<think>`), `</think>`, a blank line, then at "
                                  "least 50 characters ending in `\\boxed{A}` or `\\boxed{B}`")


def messages(prompt: str = PROMPT) -> list[dict]:
    """The chat turn for one clip: the video first, then the question (as BusterX++ feeds it)."""
    return [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": prompt}]}]


def thinks(reply: str) -> bool:
    """Whether the reply thinks: a think tag in it (with Qwen3.5's template, the reply closes the opened block)."""
    return _THINK_TAG.search(reply) is not None
