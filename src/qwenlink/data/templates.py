"""Prompt templates for instruction data: turn a conversation into text segments marked trainable or not.

Why segments rather than one string: the loss must cover only the assistant's words (+ the token that ends its turn).
Tokenizing each segment on its own gives the exact token boundary between prompt and response, which a single
tokenization of the joined text cannot guarantee. Segments whose text never changes (system prompts, role headers)
are flagged `constant` so the tokenizer can cache their ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from qwenlink.tokenizer import DEFAULT_SYSTEM_PROMPT, IM_END, IM_START

# ModelLink's alpaca template (see ../shared/reference/modellink-recipes.md).
ALPACA_SYSTEM = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request. "
    "Please note that you need to think through your response logically and step by step."
)

ROLES = ("system", "user", "assistant")


class Segment(NamedTuple):
    text: str
    trainable: bool        # labels = ids for these tokens, -100 otherwise
    constant: bool = False  # the same text in every record: its ids may be cached


@dataclass(frozen=True)
class Turn:
    role: str  # one of ROLES
    content: str


class Template:
    """Base class: `render(turns)` -> segments whose concatenation is the training text."""

    name = "base"

    def render(self, turns: list[Turn]) -> list[Segment]:
        raise NotImplementedError

    def render_alpaca(self, instruction: str, input_: str, output: str) -> list[Segment]:
        """An alpaca record: the instruction (and its input, if any) is the user turn, the output the reply."""
        query = f"{instruction}\n{input_}" if input_ else instruction
        return self.render([Turn("user", query), Turn("assistant", output)])


class ChatMLTemplate(Template):
    """Qwen1.5's chat format: `<|im_start|>{role}\\n{content}<|im_end|>\\n` per turn.

    Trainable: each assistant reply and its `<|im_end|>`. A default system turn is added when there is none, as
    Qwen1.5's own chat template does, so fine-tuned models see the same prompt at inference.
    """

    name = "chatml"

    def __init__(self, default_system: str | None = DEFAULT_SYSTEM_PROMPT) -> None:
        self.default_system = default_system

    def render(self, turns: list[Turn]) -> list[Segment]:
        segs: list[Segment] = []
        if self.default_system is not None and (not turns or turns[0].role != "system"):
            segs.append(Segment(f"{IM_START}system\n{self.default_system}{IM_END}\n", False, True))
        for t in turns:
            if t.role == "assistant":
                segs.append(Segment(f"{IM_START}assistant\n", False, True))
                segs.append(Segment(f"{t.content}{IM_END}", True))
                segs.append(Segment("\n", False, True))
            else:
                segs.append(Segment(f"{IM_START}{t.role}\n{t.content}{IM_END}\n", False))
        return segs


class AlpacaTemplate(Template):
    """ModelLink's alpaca prompt: "\\n" + SYSTEM + "\\n### Instruction:\\n" + query + "\\n### Response:\\n".

    Trainable: each reply + "\\n" (ModelLink's response text). `--append-eod` adds the end token after the last reply.
    A system turn in the data replaces the default SYSTEM text.
    """

    name = "alpaca"

    def __init__(self, system: str = ALPACA_SYSTEM) -> None:
        self.system = system

    def render(self, turns: list[Turn]) -> list[Segment]:
        segs: list[Segment] = []
        if turns and turns[0].role == "system":
            segs.append(Segment(f"\n{turns[0].content}", False))
            turns = turns[1:]
        else:
            segs.append(Segment(f"\n{self.system}", False, True))
        for t in turns:
            if t.role == "assistant":
                segs.append(Segment(f"{t.content}\n", True))
            elif t.role == "user":
                segs.append(Segment(f"\n### Instruction:\n{t.content}\n### Response:\n", False))
            else:  # a later system turn: keep its text in the prompt, never trained on
                segs.append(Segment(f"\n{t.content}", False))
        return segs

    def render_alpaca(self, instruction: str, input_: str, output: str) -> list[Segment]:
        """ModelLink joins instruction and input with "\\n" even when the input is empty; kept for identical prompts."""
        return self.render([Turn("user", f"{instruction}\n{input_}"), Turn("assistant", output)])


TEMPLATES: dict[str, type[Template]] = {"chatml": ChatMLTemplate, "alpaca": AlpacaTemplate}


def get_template(name: str) -> Template:
    try:
        return TEMPLATES[name]()
    except KeyError:
        from qwenlink.errors import QwenlinkError
        raise QwenlinkError(f"unknown template {name!r} (expected one of {', '.join(TEMPLATES)})") from None
