"""Training examples: token ids with the prompt masked out of the loss.

    tokenize_alpaca(tokenizer, instruction, input, output, train_on_inputs=False, add_eos=True) -> Example
    tokenize_chat(tokenizer, messages, train_on_inputs=False) -> Example
    truncate(example, cutoff_len), trainable_tokens(example), resolve_pad_id(tokenizer)

An example is {"input_ids": list[int], "labels": list[int]}; labels are IGNORE_INDEX (-100) where no loss
is taken. The prompt ids come from ``templates`` -- the same code that encodes a prompt for generation.
"""

from __future__ import annotations

from typing import Any

from qlora_kit.data.templates import chat_pieces, encode_prompt_ids, has_chat_template, text_ids
from qlora_kit.errors import QloraKitError

IGNORE_INDEX = -100  # labels with this value take no loss (torch cross_entropy's ignore_index)

Example = dict[str, list[int]]


def tokenize_alpaca(
    tokenizer: Any,
    instruction: str,
    input: str,
    output: str,
    *,
    train_on_inputs: bool = False,
    add_eos: bool = True,
) -> Example:
    """Prompt ids (with BOS if the tokenizer adds one) + response ids (+ EOS); prompt labels are -100
    unless train_on_inputs.

    Prompt and response are tokenized separately, so the masked boundary is exact and the prompt ids are
    the very ids generation feeds the model before it writes the response (``encode_prompt_ids``).
    """
    prompt = encode_prompt_ids(tokenizer, "alpaca", instruction, input)
    response = text_ids(tokenizer, output)
    if add_eos:
        if tokenizer.eos_token_id is None:
            raise QloraKitError("the tokenizer has no EOS token; set data.add_eos=false")
        response = [*response, tokenizer.eos_token_id]
    labels = list(prompt) if train_on_inputs else [IGNORE_INDEX] * len(prompt)
    return {"input_ids": prompt + response, "labels": labels + response}


def tokenize_chat(tokenizer: Any, messages: list[dict[str, str]], *, train_on_inputs: bool = False) -> Example:
    """Render through the chat template; only the tokens each assistant message adds take loss.

    The pieces come from ``templates.chat_pieces`` (see there): everything before an assistant message's
    own tokens is the generation prompt ``encode_prompt_ids`` gives. The template's own special tokens are
    in the text; data.add_eos does not apply, the template ends each turn itself.
    """
    if not has_chat_template(tokenizer):
        raise QloraKitError(
            "data.format=chat needs a tokenizer with a chat template; this one has none. "
            "Use data.format=alpaca or a chat model's tokenizer"
        )
    input_ids: list[int] = []
    labels: list[int] = []
    for ids, trainable in chat_pieces(tokenizer, messages):
        input_ids.extend(ids)
        labels.extend(ids if trainable or train_on_inputs else [IGNORE_INDEX] * len(ids))
    return {"input_ids": input_ids, "labels": labels}


def truncate(example: Example, cutoff_len: int) -> Example:
    """Keep the first cutoff_len tokens (the prompt, and as much of the response as fits)."""
    return {key: ids[:cutoff_len] for key, ids in example.items()}


def trainable_tokens(example: Example) -> int:
    return sum(label != IGNORE_INDEX for label in example["labels"])


def resolve_pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise QloraKitError("the tokenizer has neither a pad token nor an EOS token to pad with")
    return pad
