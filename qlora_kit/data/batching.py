"""Micro-batches: padding, packing, and an epoch order that is a pure function of (seed, epoch), so it resumes exactly.

    BatchPlan(examples, micro_batch_size, pad_token_id=..., seed=..., group_by_length=..., packing=...,
              cutoff_len=..., pad_to_multiple_of=None)
        len(plan) micro-batches per epoch; plan.next_batch() -> dict of tensors, advancing (epoch, position);
        plan.batches_for_epoch(epoch) -> the epoch's order; plan.state_dict() / plan.load_state_dict(state)
    collate(examples, pad_token_id, pad_to_multiple_of=None) -> {"input_ids", "attention_mask", "labels"}
        (packed rows: {"input_ids", "position_ids", "labels"}, see below)
    pack(examples) -> one packed row; pack_blocks(lengths, block_len) -> example indices per block
    eval_batches(examples, batch_size, pad_token_id, pad_to_multiple_of=None) -> iterator of collated batches

Packed batches: each row holds several examples back to back, ``position_ids`` restart at 0 for each one
and there is no ``attention_mask``. Call ``model(**batch, use_cache=False)``: transformers then derives a
per-example block-diagonal causal mask from ``position_ids``, which it only does when no 2-D attention
mask and no cache are passed. Right padding never needs masking under a causal mask: real tokens come
before the padding and so never attend to it, and padded positions carry no loss.
"""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from qlora_kit.data.tokenize import IGNORE_INDEX, Example
from qlora_kit.errors import QloraKitError

GROUPING_MEGABATCH = 50  # length grouping sorts within windows of 50 micro-batches, like HF's sampler


def collate(
    examples: Sequence[Mapping[str, Sequence[int]]], pad_token_id: int, pad_to_multiple_of: int | None = None
) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row (rounded up to pad_to_multiple_of); labels pad with -100.

    Rows with ``position_ids`` (packed) get position_ids instead of an attention_mask; see the module notes.
    """
    width = max(len(example["input_ids"]) for example in examples)
    if pad_to_multiple_of:
        width = math.ceil(width / pad_to_multiple_of) * pad_to_multiple_of
    packed = all("position_ids" in example for example in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    # Padding counts up from 0 as one more "example", so packed-sequence detection sees it as separate.
    position_ids = torch.arange(width, dtype=torch.long).repeat(len(examples), 1)
    for row, example in enumerate(examples):
        length = len(example["input_ids"])
        input_ids[row, :length] = torch.tensor(example["input_ids"], dtype=torch.long)
        labels[row, :length] = torch.tensor(example["labels"], dtype=torch.long)
        attention_mask[row, :length] = 1
        if packed:
            position_ids[row, :length] = torch.tensor(example["position_ids"], dtype=torch.long)
            position_ids[row, length:] = torch.arange(width - length)
    if packed:
        return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def pack(examples: Sequence[Example]) -> dict[str, list[int]]:
    """Concatenate examples into one row; position_ids restart per example.

    Each example's first label is masked: it would be predicted from the previous example's last token.
    """
    row: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
    for example in examples:
        row["input_ids"].extend(example["input_ids"])
        row["labels"].extend([IGNORE_INDEX, *example["labels"][1:]])
        row["position_ids"].extend(range(len(example["input_ids"])))
    return row


def pack_blocks(lengths: Sequence[int], block_len: int) -> list[list[int]]:
    """Group example indices into blocks of at most block_len tokens (best-fit decreasing; never splits one).

    A pure function of the lengths, so the number of micro-batches per epoch is fixed; the epoch order
    shuffles the blocks, not their contents.
    """
    blocks: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (space left, block index)
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        length = lengths[index]
        if length > block_len:
            raise QloraKitError(
                f"example {index} has {length} tokens, more than the packing block of "
                f"{block_len}; truncate examples to data.cutoff_len first"
            )
        slot = bisect.bisect_left(free, (length, -1))
        if slot == len(free):
            blocks.append([index])
            bisect.insort(free, (block_len - length, len(blocks) - 1))
        else:
            space, block = free.pop(slot)
            blocks[block].append(index)
            bisect.insort(free, (space - length, block))
    return blocks


class BatchPlan:
    """Micro-batches of an epoch in an order that is a pure function of (seed, epoch).

    The state is just (epoch, position), so a resumed run continues at exactly the next micro-batch.
    Length grouping shuffles, then sorts by length within windows of 50 micro-batches (like HF's
    LengthGroupedSampler): batches hold similar lengths, so little padding, while the order stays random.
    The epoch's longest example is moved into its first batch, so a batch that does not fit in memory
    fails at the first step rather than hours in.
    """

    def __init__(
        self,
        examples: Sequence[Example],
        micro_batch_size: int,
        *,
        pad_token_id: int,
        seed: int = 42,
        group_by_length: bool = True,
        packing: bool = False,
        cutoff_len: int | None = None,
        pad_to_multiple_of: int | None = None,
    ) -> None:
        if not examples:
            raise QloraKitError("there are no training examples to batch")
        if micro_batch_size < 1:
            raise QloraKitError(f"train.micro_batch_size={micro_batch_size} must be at least 1")
        if packing and not cutoff_len:
            raise QloraKitError("packing needs cutoff_len (the block length)")
        self.examples = examples
        self.micro_batch_size = micro_batch_size
        self.pad_token_id = pad_token_id
        self.seed = seed
        self.group_by_length = group_by_length and not packing  # packed blocks are all about cutoff_len long
        self.packing = packing
        self.pad_to_multiple_of = pad_to_multiple_of
        lengths = [len(example["input_ids"]) for example in examples]
        self.blocks = pack_blocks(lengths, cutoff_len) if packing else [[i] for i in range(len(examples))]
        self.block_lengths = [sum(lengths[i] for i in block) for block in self.blocks]
        self.num_tokens = sum(lengths)
        self.epoch = 0
        self.position = 0  # index of the next micro-batch within the epoch
        self._order: tuple[int, list[list[list[int]]]] | None = None  # cached (epoch, batches)

    def __len__(self) -> int:
        """Micro-batches per epoch (the last one may be smaller)."""
        return math.ceil(len(self.blocks) / self.micro_batch_size)

    def batches_for_epoch(self, epoch: int) -> list[list[list[int]]]:
        """The epoch's micro-batches; each is a list of rows, each row a list of example indices."""
        # A string seed goes through SHA-512, so the order is the same in every process and Python version.
        rng = random.Random(f"qlora-kit:{self.seed}:{epoch}")
        order = list(range(len(self.blocks)))
        rng.shuffle(order)
        size = self.micro_batch_size
        if self.group_by_length:
            window = size * GROUPING_MEGABATCH
            windows = [
                sorted(order[i : i + window], key=lambda b: -self.block_lengths[b])
                for i in range(0, len(order), window)
            ]
            longest = max(range(len(windows)), key=lambda w: self.block_lengths[windows[w][0]])
            windows[0][0], windows[longest][0] = windows[longest][0], windows[0][0]
            order = [block for w in windows for block in w]
        return [[self.blocks[b] for b in order[i : i + size]] for i in range(0, len(order), size)]

    def next_batch(self) -> dict[str, torch.Tensor]:
        """Collate the micro-batch at (epoch, position), then advance (rolling over into the next epoch)."""
        rows = self._advance()
        if self.packing:
            examples = [pack([self.examples[i] for i in row]) for row in rows]
        else:
            examples = [self.examples[row[0]] for row in rows]
        return collate(examples, self.pad_token_id, self.pad_to_multiple_of)

    def skip(self) -> None:
        """Advance past the micro-batch at (epoch, position) without collating it (another process takes it)."""
        self._advance()

    def _advance(self) -> list[list[int]]:
        """The rows of the micro-batch at (epoch, position); moves to the next one."""
        if self._order is None or self._order[0] != self.epoch:
            self._order = (self.epoch, self.batches_for_epoch(self.epoch))
        rows = self._order[1][self.position]
        self.position += 1
        if self.position == len(self):
            self.epoch, self.position = self.epoch + 1, 0
        return rows

    @property
    def epochs_done(self) -> float:
        return self.epoch + self.position / len(self)

    def _fingerprint(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "micro_batch_size": self.micro_batch_size,
            "group_by_length": self.group_by_length,
            "packing": self.packing,
            "num_examples": len(self.examples),
            "num_tokens": self.num_tokens,
            "batches_per_epoch": len(self),
        }

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, **self._fingerprint()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        changed = [
            f"{key} {state.get(key)!r} -> {value!r}"
            for key, value in self._fingerprint().items()
            if state.get(key) != value
        ]
        if changed:
            raise QloraKitError(
                "cannot resume the data order exactly: the data or batching settings changed "
                f"since the checkpoint ({'; '.join(changed)}); resume with the same data and "
                "settings, or start a new run"
            )
        if not 0 <= state["position"] < len(self):
            raise QloraKitError(
                f"checkpoint data position {state['position']} is outside the epoch's {len(self)} micro-batches"
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def eval_batches(
    examples: Sequence[Example], batch_size: int, pad_token_id: int, pad_to_multiple_of: int | None = None
) -> Iterator[dict[str, torch.Tensor]]:
    """Validation batches, longest first: little padding, and the peak-memory batch comes first."""
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i]["input_ids"]), i))
    for start in range(0, len(order), batch_size):
        yield collate([examples[i] for i in order[start : start + batch_size]], pad_token_id, pad_to_multiple_of)
