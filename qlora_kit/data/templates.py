"""Prompt templates, and the ONE prompt encoding that training and generation share.

    alpaca_prompt(instruction, input="") -> str: the Alpaca-LoRA prompt text, verbatim
    encode_prompt_ids(tokenizer, template, instruction, input="") -> list[int]: a prompt's token ids, exactly
        the ids a training example of that template starts with (so the model is prompted at generation
        time token for token as it was trained)
    chat_pieces(tokenizer, messages, add_generation_prompt=False) -> [(ids, trainable)]: a conversation
        rendered through the tokenizer's chat template one message at a time
    guanaco_to_messages(text) -> messages: "### Human: ... ### Assistant: ..." text as chat messages

Templates (``facts.PROMPT_TEMPLATES``): ``alpaca`` (BOS if the tokenizer adds one, then the Alpaca-LoRA
prompt), ``chat`` (the chat template's generation prompt after one user message) and ``none`` (the raw
text after the tokenizer's own special prefix). Prompt text is tokenized without special tokens and the
tokenizer's prefix (a BOS, if any) is put in front by hand: the prefix then appears exactly once, and a
tokenizer that appends an EOS to every text cannot end the prompt with one.
"""

from __future__ import annotations

import functools
import re
from typing import Any

from qlora_kit.errors import QloraKitError
from qlora_kit.facts import PROMPT_TEMPLATES

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

ChatPiece = tuple[list[int], bool]  # token ids, and whether they are an assistant message's own (trainable)


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The Alpaca-LoRA prompt, verbatim; the response follows it directly."""
    if input:
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def prompt_template(data_format: str, template: str) -> str:
    """The prompt template a run's data is formatted with (recorded with its adapter for ``generate``)."""
    return "chat" if data_format == "chat" else template


def guanaco_to_messages(text: str) -> list[dict[str, str]]:
    """Split Guanaco/OASST text ("### Human: ... ### Assistant: ...") into chat messages."""
    parts = re.split(r"###\s*(Human|Assistant)\s*:", text)
    if len(parts) < 3:
        raise ValueError("no '### Human:' / '### Assistant:' markers")
    messages = []
    if parts[0].strip():  # text before the first marker acts as a system prompt
        messages.append({"role": "system", "content": parts[0].strip()})
    for speaker, content in zip(parts[1::2], parts[2::2], strict=True):
        messages.append({"role": "user" if speaker == "Human" else "assistant", "content": content.strip()})
    return messages


@functools.lru_cache(maxsize=8)
def special_prefix(tokenizer: Any) -> tuple[int, ...]:
    """Ids the tokenizer puts before text by itself (a BOS for Llama tokenizers, nothing for SmolLM2)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    special = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(special) - len(plain) + 1):
        if special[start : start + len(plain)] == plain:
            return tuple(special[:start])
    return ()


def text_ids(tokenizer: Any, text: str) -> list[int]:
    """``text``'s ids with no special token added (the template's own special tokens are in the text)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def chat_pieces(
    tokenizer: Any, messages: list[dict[str, str]], *, add_generation_prompt: bool = False
) -> list[ChatPiece]:
    """The conversation through the chat template, one piece per rendered prefix.

    Prefixes are rendered one message at a time and each new stretch of text is tokenized on its own: the
    text an assistant message adds after the generation prompt (its content and end-of-turn token) is a
    trainable piece, every other piece is not. ``add_generation_prompt`` ends with the generation prompt for
    the reply to the last message: exactly the pieces a training conversation has before that reply, so a
    prompt encoded this way is the prompt the model was trained on. Raises ValueError if the template renders
    a prefix differently once later messages are added (the pieces would not line up).
    """

    def render(prefix: list[dict[str, str]], generation_prompt: bool = False) -> str:
        return tokenizer.apply_chat_template(prefix, tokenize=False, add_generation_prompt=generation_prompt)

    pieces: list[ChatPiece] = []
    rendered = ""

    def add(text: str, trainable: bool) -> None:
        nonlocal rendered
        if not text.startswith(rendered):
            raise ValueError(
                "the chat template renders a conversation differently once later messages "
                "are added, so the assistant turns cannot be located"
            )
        pieces.append((text_ids(tokenizer, text[len(rendered) :]), trainable))
        rendered = text

    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            add(render(messages[:i], generation_prompt=True), trainable=False)
            add(render(messages[: i + 1]), trainable=True)
        else:
            add(render(messages[: i + 1]), trainable=False)
    if add_generation_prompt:
        add(render(messages, generation_prompt=True), trainable=False)
    return pieces


def encode_prompt_ids(tokenizer: Any, template: str, instruction: str, input: str = "") -> list[int]:
    """The token ids of a prompt in ``template`` (one of ``facts.PROMPT_TEMPLATES``), ready to generate from.

    ``alpaca``: BOS if the tokenizer adds one + the Alpaca-LoRA prompt of ``instruction`` and ``input`` --
    the prompt ids of every Alpaca training example (``tokenize_alpaca`` builds them here). ``chat``: the chat
    template's generation prompt after one user message ``instruction``, rendered piece by piece as
    ``tokenize_chat`` renders a training conversation. ``none``: the tokenizer's special prefix + the text.
    ``input`` is an Alpaca field; the other templates take the whole prompt as ``instruction``.
    """
    if template not in PROMPT_TEMPLATES:
        raise QloraKitError(f"unknown prompt template {template!r}; use one of: {', '.join(PROMPT_TEMPLATES)}")
    if input and template != "alpaca":
        raise QloraKitError(
            f"the {template!r} template has no separate input; put the whole prompt in the instruction "
            "(only the alpaca template has an input section)"
        )
    if template == "alpaca":
        return [*special_prefix(tokenizer), *text_ids(tokenizer, alpaca_prompt(instruction, input))]
    if template == "none":
        return [*special_prefix(tokenizer), *text_ids(tokenizer, instruction)]
    if not has_chat_template(tokenizer):
        raise QloraKitError(
            "the chat template needs a tokenizer with a chat template; this one has none. "
            "Use the alpaca or none template"
        )
    try:
        pieces = chat_pieces(tokenizer, [{"role": "user", "content": instruction}], add_generation_prompt=True)
    except ValueError as e:
        raise QloraKitError(f"the tokenizer's chat template cannot be used: {e}") from None
    return [token for ids, _ in pieces for token in ids]
