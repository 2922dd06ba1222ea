"""New tokens and trainable embeddings, beside the LoRA adapters, in PEFT's layout.

Two ways to train what the 4-bit base keeps dense (``lora.trainable_tokens``, ``lora.modules_to_save``):

- **trainable tokens**: only the rows of some tokens train. ``TrainableTokens`` wraps the input embedding
  (``TrainableTokensHead`` the output head) and replaces those rows by a trainable ``trainable_tokens_delta``
  (n x hidden; PEFT's name: it holds the rows' values, not a difference), initialized from the rows it
  replaces. New tokens are added to the tokenizer, the embeddings resized (new rows start at the mean of the
  old ones) and trained this way. Untied models train the tokens' rows of ``lm_head`` too (so the model can
  also *emit* them); tied models (SmolLM2) share one delta between the input embedding and the head, as
  tying means.
  PEFT: ``trainable_token_indices: {embed_tokens: [...], lm_head: [...]}`` and
  ``...embed_tokens.token_adapter.trainable_tokens_delta``.
- **modules_to_save** (``embed_tokens``, ``lm_head``): the module trains in full, as a copy of its weight.
  On a tied model the two are one matrix: one trainable copy, tied, saved under both names with
  ``ensure_weight_tying: true`` (what PEFT 0.21 writes and reads back tied). PEFT: ``modules_to_save`` and
  ``...embed_tokens.weight`` / ``...lm_head.weight``.

Both are in the compute dtype (the dtype of the weights they replace; fp32 master copies for 16-bit ones
come from the optimizer, as for 16-bit adapters). ``memory.extras`` plans their weights, gradients and states.
The LoRA layers are not touched: this module only swaps the embedding and head modules.

Loading such an adapter grows the base to the vocabulary it needs (``EmbeddingSettings.vocab_size``: its highest
trained token id + 1, or its saved modules' rows). A run trains every token it adds, so that is the run's
vocabulary; an adapter that grew the vocabulary by tokens it did not train cannot say so (PEFT's files have
no vocabulary key) and loads with the smaller one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qlora_kit.errors import QloraKitError
from qlora_kit.facts import EMBEDDING_MODULES
from qlora_kit.lora import PEFT_PREFIX

EMBED, HEAD = EMBEDDING_MODULES  # the names PEFT's configs use (leaf names of Llama-style models)
DELTA_SUFFIX = ".token_adapter.trainable_tokens_delta"


@dataclass
class EmbeddingSettings:
    """What an adapter's embeddings are: PEFT's three config keys."""

    trainable_token_indices: dict[str, list[int]] = field(default_factory=dict)  # module leaf name -> token ids
    modules_to_save: list[str] = field(default_factory=list)
    ensure_weight_tying: bool = False

    def __bool__(self) -> bool:
        return bool(self.trainable_token_indices or self.modules_to_save)

    def holds(self, key: str) -> bool:
        """``key`` is one of these embeddings' tensors (PEFT's on-disk name), by what the config lists."""
        if not key.startswith(PEFT_PREFIX):
            return False
        if key.endswith(DELTA_SUFFIX):
            return key.removesuffix(DELTA_SUFFIX).rsplit(".", 1)[-1] in self.trainable_token_indices
        return key.endswith(".weight") and key.removesuffix(".weight").rsplit(".", 1)[-1] in self.modules_to_save

    def vocab_size(self, state: dict[str, torch.Tensor], current: int) -> int:
        """The vocabulary the adapter needs: its saved modules' rows, its highest token id + 1, ``current``."""
        needed = [current, *(max(ids) + 1 for ids in self.trainable_token_indices.values() if ids)]
        needed += [t.shape[0] for k, t in state.items() if k.endswith(".weight")]
        return max(needed)


# --- the modules ---------------------------------------------------------------------------------------------


class _TokenRows(nn.Module):
    """What both token layers hold: ``base``, the rows they replace (``token_indices``) and those rows' trainable
    values (``trainable_tokens_delta``, initialized from the rows; ``tied_to``: share that layer's instead)."""

    def _init_rows(self, base: nn.Module, token_indices: Sequence[int], tied_to: _TokenRows | None) -> None:
        self.base = base
        weight = base.weight
        self.register_buffer("token_indices", torch.tensor(list(token_indices), dtype=torch.long, device=weight.device))
        if tied_to is None:
            self.trainable_tokens_delta = nn.Parameter(weight.detach()[self.token_indices].clone())
        else:
            self.trainable_tokens_delta = tied_to.trainable_tokens_delta  # one Parameter, two users


class TrainableTokens(_TokenRows):
    """The input embedding with the rows ``token_indices`` trainable: only the positions holding those tokens
    look up the trained rows (no copy of the vocabulary-sized matrix per forward)."""

    def __init__(self, base: nn.Embedding, token_indices: Sequence[int]) -> None:
        super().__init__()
        self._init_rows(base, token_indices, None)
        # vocab -> row of the delta (-1: the base's row); a buffer, so it moves with the module
        lookup = torch.full((base.weight.shape[0],), -1, dtype=torch.long, device=base.weight.device)
        lookup[self.token_indices] = torch.arange(len(token_indices), device=base.weight.device)
        self.register_buffer("row_of", lookup, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        rows = self.row_of[x]
        picked = self.trainable_tokens_delta[rows.clamp(min=0)].to(out.dtype)
        return torch.where((rows >= 0).unsqueeze(-1), picked, out)

    @property
    def weight(self) -> torch.Tensor:
        """The base's weight (what code asking an embedding for its ``weight`` wants: shape, dtype, device,
        tying), without the trained rows."""
        return self.base.weight


class TrainableTokensHead(_TokenRows, nn.Linear):
    """The output head with the rows ``token_indices`` trainable. An ``nn.Linear`` whose ``weight`` is the base's
    with the trained rows in place (differentiable in them), so the chunked loss (``loss.py``) keeps its path:
    one vocabulary-sized copy of the head and its fp32 gradient during the loss, never the logits of all
    labelled tokens at once."""

    def __init__(self, base: nn.Linear, token_indices: Sequence[int], tied_to: _TokenRows | None = None) -> None:
        nn.Module.__init__(self)  # not nn.Linear's: the weight is the base's, merged on use
        self.in_features, self.out_features = base.in_features, base.out_features
        self.register_parameter("bias", None)
        self._init_rows(base, token_indices, tied_to)

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        delta = self.trainable_tokens_delta.to(self.base.weight.dtype)
        return self.base.weight.index_copy(0, self.token_indices, delta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class SavedEmbedding(nn.Embedding):
    """A module of ``modules_to_save``: the input embedding, trained in full (a copy of the base's)."""


class SavedHead(nn.Linear):
    """A module of ``modules_to_save``: the output head, trained in full (an ``nn.Linear``, so the chunked
    loss keeps its fast path)."""


def _trainable_copy(module: nn.Module, weight: nn.Parameter | None = None) -> nn.Module:
    """``module`` as a Saved* module holding ``weight`` (default: a trainable copy of its own)."""
    weight = weight if weight is not None else nn.Parameter(module.weight.detach().clone())
    if isinstance(module, nn.Embedding):
        copy = SavedEmbedding(module.num_embeddings, module.embedding_dim, module.padding_idx, device="meta")
    else:
        copy = SavedHead(module.in_features, module.out_features, bias=False, device="meta")
    copy.weight = weight
    copy.__dict__["replaced"] = module  # the frozen original (not a submodule): what disabling puts back
    return copy


def bare_module(module: nn.Module) -> nn.Module:
    """The base module a trainable-embedding module stands for (``module`` itself when it is not one)."""
    if isinstance(module, _TokenRows):
        return module.base
    return module.__dict__.get("replaced", module)


def embedding_paths(model: nn.Module) -> list[str]:
    """The module paths of the model's input embedding and output head."""
    return list(_paths(model).values())


# --- where they go -------------------------------------------------------------------------------------------


def _paths(model: nn.Module) -> dict[str, str]:
    """``embed_tokens`` / ``lm_head`` -> the module path of the model's input embedding / output head."""
    found = {}
    for leaf, module in ((EMBED, model.get_input_embeddings()), (HEAD, model.get_output_embeddings())):
        found[leaf] = next(name for name, m in model.named_modules() if m is module)
    return found


def _base_of(module: nn.Module) -> nn.Module:
    return module.base if isinstance(module, _TokenRows) else module


def is_tied(model: nn.Module) -> bool:
    head = _base_of(model.get_output_embeddings())
    return head.weight is _base_of(model.get_input_embeddings()).weight


def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def resize_vocab(model: nn.Module, vocab_size: int) -> None:
    """Grow the embeddings (and an untied head) to ``vocab_size`` rows; new rows start at the mean of the old
    ones (each matrix its own), deterministic, so no RNG draw shifts the adapters' init."""
    current = model.get_input_embeddings().weight.shape[0]
    if vocab_size <= current:
        return
    tied = is_tied(model)
    old_head = None if tied else model.get_output_embeddings().weight.detach().clone()
    old_embed = model.get_input_embeddings().weight.detach().clone()
    model.resize_token_embeddings(vocab_size, mean_resizing=False)
    with torch.no_grad():
        model.get_input_embeddings().weight[current:] = old_embed.float().mean(0).to(old_embed.dtype)
        if old_head is not None:
            model.get_output_embeddings().weight[current:] = old_head.float().mean(0).to(old_head.dtype)
    if tied:
        model.get_output_embeddings().weight = model.get_input_embeddings().weight


def add_trainable_embeddings(
    model: nn.Module,
    token_ids: Sequence[int] = (),
    modules_to_save: Sequence[str] = (),
    token_sides: Sequence[str] | None = None,
) -> EmbeddingSettings:
    """Make ``modules_to_save`` (``embed_tokens``, ``lm_head``) train in full and the rows of ``token_ids``
    train in ``token_sides`` (default: each of the two not saved in full; a tied model's head always shares
    the input embedding's delta). Call after ``add_lora`` (which freezes the model) and after
    ``resize_vocab``. Returns the settings to save."""
    unknown = sorted(set(modules_to_save) - set(EMBEDDING_MODULES))
    if unknown:
        raise QloraKitError(
            f"lora.modules_to_save: {unknown} cannot be trained in full here; the choices are {list(EMBEDDING_MODULES)}"
        )
    vocab = model.get_input_embeddings().weight.shape[0]
    bad = [i for i in token_ids if not 0 <= i < vocab]
    if bad:
        raise QloraKitError(f"trainable token ids {bad} are outside the vocabulary (0..{vocab - 1})")
    paths, tied = _paths(model), is_tied(model)
    saved = set(EMBEDDING_MODULES) if tied and modules_to_save else set(modules_to_save)  # tied: one matrix
    shared = None
    for leaf in EMBEDDING_MODULES:
        if leaf in saved:
            copy = _trainable_copy(model.get_submodule(paths[leaf]), shared)
            shared = copy.weight if tied else None
            _set(model, paths[leaf], copy)
    ids = sorted(set(token_ids))
    sides = [leaf for leaf in (token_sides or EMBEDDING_MODULES) if leaf not in saved] if ids else []
    if tied and EMBED in sides:  # the head of a tied model reads the input embedding's rows
        embed = TrainableTokens(model.get_submodule(paths[EMBED]), ids)
        _set(model, paths[EMBED], embed)
        _set(model, paths[HEAD], TrainableTokensHead(model.get_submodule(paths[HEAD]), ids, tied_to=embed))
    else:
        for leaf in sides:
            layer = TrainableTokens if leaf == EMBED else TrainableTokensHead
            _set(model, paths[leaf], layer(model.get_submodule(paths[leaf]), ids))
    return embedding_settings(model)


# --- state dicts in PEFT's layout ----------------------------------------------------------------------------


def embedding_settings(model: nn.Module) -> EmbeddingSettings:
    """The settings of the trainable embeddings ``model`` holds (empty: none)."""
    paths, settings = _paths(model), EmbeddingSettings()
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    for leaf in EMBEDDING_MODULES:
        module = model.get_submodule(paths[leaf])
        if isinstance(module, (SavedEmbedding, SavedHead)):
            settings.modules_to_save.append(leaf)
        elif isinstance(module, _TokenRows):
            shared = leaf == HEAD and getattr(embed, "trainable_tokens_delta", None) is module.trainable_tokens_delta
            if not shared:  # a tied head's rows are the input embedding's: PEFT saves them once
                settings.trainable_token_indices[leaf] = module.token_indices.tolist()
    settings.ensure_weight_tying = bool(settings.modules_to_save) and embed.weight is head.weight
    return settings


def _trained(model: nn.Module) -> dict[str, nn.Parameter]:
    """PEFT's on-disk key -> the parameter it holds, for the model's trainable embeddings."""
    paths, settings, found = _paths(model), embedding_settings(model), {}
    for leaf in settings.trainable_token_indices:
        found[f"{PEFT_PREFIX}{paths[leaf]}{DELTA_SUFFIX}"] = model.get_submodule(paths[leaf]).trainable_tokens_delta
    for leaf in settings.modules_to_save:  # a tied matrix under both names, as PEFT writes it
        found[f"{PEFT_PREFIX}{paths[leaf]}.weight"] = model.get_submodule(paths[leaf]).weight
    return found


def embedding_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable embeddings' tensors under PEFT's on-disk key names (a tied matrix a second time as a copy:
    safetensors refuses tensors that share memory)."""
    state: dict[str, torch.Tensor] = {}
    for key, param in _trained(model).items():
        shared = any(param is kept for kept in state.values())
        state[key] = param.detach().clone() if shared else param
    return {key: tensor.detach() for key, tensor in state.items()}


def load_embedding_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str = "adapter") -> None:
    """Copy the tensors ``embedding_state_dict`` names into ``model``'s trainable embeddings; names and shapes
    must match."""
    ours = _trained(model)
    if set(ours) != set(state):
        missing, extra = sorted(set(ours) - set(state)), sorted(set(state) - set(ours))
        raise QloraKitError(
            f"{source}: its embedding tensors do not match this model's trainable embeddings (missing: "
            f"{missing or 'none'}; not in the model: {extra or 'none'}); lora.trainable_tokens and "
            "lora.modules_to_save must be the ones the adapter was trained with"
        )
    with torch.no_grad():
        for key, tensor in state.items():
            if tensor.shape != ours[key].shape:
                raise QloraKitError(
                    f"{source}: {key} has shape {tuple(tensor.shape)} but the model needs {tuple(ours[key].shape)}"
                )
            ours[key].copy_(tensor)


def apply_embeddings(
    model: nn.Module, settings: EmbeddingSettings, state: dict[str, torch.Tensor], source: str = "adapter"
) -> None:
    """What an adapter's embeddings need on a freshly loaded model: its vocabulary, its trainable modules, its
    values (``adapter.load_adapter`` calls this after the LoRA layers)."""
    if not settings and not state:
        return
    indices = settings.trainable_token_indices
    if len({tuple(sorted(ids)) for ids in indices.values()}) > 1:
        raise QloraKitError(
            f"{source}: trainable_token_indices lists other tokens for {' and '.join(indices)}; qlora-kit trains "
            "the same tokens in both"
        )
    saved = [tensor for key, tensor in state.items() if key.endswith(".weight")]
    if is_tied(model) and len(saved) == 2 and not torch.equal(*saved):
        raise QloraKitError(
            f"{source}: this model ties lm_head to embed_tokens, and the adapter saved them as two different "
            "matrices (modules_to_save without ensure_weight_tying); load it on an untied copy of the base"
        )
    resize_vocab(model, settings.vocab_size(state, model.get_input_embeddings().weight.shape[0]))
    ids = next(iter(indices.values()), [])
    add_trainable_embeddings(model, ids, settings.modules_to_save, token_sides=list(indices))
    load_embedding_state_dict(model, state, source)


def merged_rows(
    key: str, tensor: torch.Tensor, settings: EmbeddingSettings, state: dict[str, torch.Tensor], vocab: int
) -> torch.Tensor:
    """The export's value of a base tensor ``key`` (``model.embed_tokens.weight``, ``lm_head.weight``): the saved
    module's weight, or the base's rows grown to ``vocab`` as ``resize_vocab`` grows them, with the trained
    tokens' rows. A tied head's rows come from the input embedding (its only tensor in a tied checkpoint)."""
    path = key.removesuffix(".weight")
    saved = state.get(f"{PEFT_PREFIX}{key}")
    if saved is not None:
        return saved
    delta = state.get(f"{PEFT_PREFIX}{path}{DELTA_SUFFIX}")
    leaf = path.rsplit(".", 1)[-1]
    grown = torch.cat([tensor, tensor.float().mean(0, keepdim=True).to(tensor.dtype).expand(vocab - len(tensor), -1)])
    if delta is None or leaf not in settings.trainable_token_indices:
        return grown
    index = torch.tensor(settings.trainable_token_indices[leaf])
    return grown.index_copy(0, index, delta.to(grown.dtype))


def embedding_settings_from_json(raw: dict) -> EmbeddingSettings:
    """The embedding keys of an adapter_config.json (PEFT's: a plain list of token ids means the input
    embedding's). ValueError names what is wrong."""
    modules = raw.get("modules_to_save") or []
    indices = raw.get("trainable_token_indices") or {}
    if isinstance(indices, list):
        indices = {EMBED: indices}
    if not isinstance(modules, list) or not isinstance(indices, dict):
        raise ValueError("modules_to_save must be a list and trainable_token_indices a list or a mapping")
    unknown = sorted({*modules, *indices} - set(EMBEDDING_MODULES))
    if unknown:
        raise ValueError(
            f"modules_to_save / trainable_token_indices name {unknown}; qlora-kit trains {list(EMBEDDING_MODULES)}"
        )
    if not all(isinstance(ids, list) and all(isinstance(i, int) for i in ids) for ids in indices.values()):
        raise ValueError("trainable_token_indices must map module names to lists of token ids")
    return EmbeddingSettings(dict(indices), list(modules), bool(raw.get("ensure_weight_tying", False)))


# --- a training run's tokens ---------------------------------------------------------------------------------


def add_tokens(tokenizer: Any, tokens: Sequence[str]) -> list[int]:
    """The ids of ``tokens``, adding to ``tokenizer`` those it lacks (in order, so the ids are the same on every
    run and resume)."""
    if not tokens:
        return []
    vocab = tokenizer.get_vocab()
    new = [token for token in tokens if token not in vocab]
    if new:
        tokenizer.add_tokens(new)
    return [int(i) for i in tokenizer.convert_tokens_to_ids(list(tokens))]


def add_run_embeddings(model: nn.Module, tokenizer: Any, tokens: Sequence[str], modules_to_save: Sequence[str]) -> int:
    """A run's ``lora.trainable_tokens`` and ``lora.modules_to_save`` on its model (after ``add_lora``): the
    vocabulary grown to the tokenizer's new tokens, the trainable modules in place. Returns the number of
    trainable values added."""
    ids = add_tokens(tokenizer, tokens)
    resize_vocab(model, max([*ids, -1]) + 1)
    add_trainable_embeddings(model, ids, modules_to_save)
    return sum(param.numel() for param in {id(p): p for p in _trained(model).values()}.values())
