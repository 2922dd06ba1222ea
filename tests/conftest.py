"""Shared fixtures: tiny random models built from a config (fast) and the real SmolLM2-135M (slow)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from qlora_kit.models import resolve_model_dir

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def tiny_config(family: str = "llama", **overrides):
    """A 2-layer model of the given family whose linear shapes are all different (so tests can tell them apart)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        vocab_size=320,
        hidden_size=128,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    common.update(overrides)
    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[family]
    return cls(**common)


def save_tiny_checkpoint(
    path: Path, family: str = "llama", max_shard_size: str | None = None, seed: int = 0, **overrides
) -> Path:
    """A random-init checkpoint dir written by transformers itself (config.json + safetensors)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides), dtype=torch.float32)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    return path


def save_tiny_smollm2_checkpoint(path: Path, smollm2_dir: Path) -> Path:
    """A tiny random Llama that uses SmolLM2's real tokenizer (vocab 49152)."""
    save_tiny_checkpoint(
        path, vocab_size=49152, hidden_size=64, intermediate_size=128, pad_token_id=2, bos_token_id=1, eos_token_id=2
    )
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (smollm2_dir / name).is_file():
            shutil.copy(smollm2_dir / name, path / name)
    return path


@pytest.fixture
def tiny_llama_dir(tmp_path: Path) -> Path:
    return save_tiny_checkpoint(tmp_path / "tiny-llama")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct (installed by the README's set-up command, converted once)."""
    return resolve_model_dir("smollm2-135m-instruct")
