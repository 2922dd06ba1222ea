"""Text generation with a base model + adapter (or an exported merged dir), greedy or sampled, streamed.

``generate_text`` is the library call (the trainer's before/after samples use it, so a run's samples are
exactly what ``qlora-kit generate`` prints for the same prompt); ``load_for_generation`` loads what
``qlora-kit generate`` (``cli.generate_main``) is pointed at.

What loads how:

- a base model: its decoder linears in NF4, the adapter as a separate LoRA path: the training-time model.
  ``--merge-adapter`` folds each adapted layer into one dense ``nn.Linear`` holding
  ``dequant(W_nf4) + scaling * B @ A`` in the compute dtype: NF4 codes cannot absorb the update without
  re-quantizing (which would change the model), so folding trades memory (16/32 bits per value instead of
  about 4.1) for one matmul per layer instead of a dequantize plus three.
- a merged export (``qlora_kit.json`` says ``kind: export``): dense, as written. Re-quantizing merged weights
  to NF4 (``--quantize``) rounds most of the LoRA update away (it is often smaller than one NF4 step), so
  that is only done when asked, with a note.
- a bitsandbytes NF4 checkpoint (``export --quantize nf4``): its 4-bit codes as they are, by our loader;
  other bitsandbytes formats go through transformers (without adapters).

``--template auto`` uses the template recorded with the adapter (or the export), i.e. the one training
formatted its data with; without a record, the tokenizer's chat template if it has one, else Alpaca.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from qlora_kit.adapter import INIT_KEY, METADATA_NAME, Adapter, find_adapter_dir, read_adapter, read_metadata
from qlora_kit.adapters import DEFAULT_NAME, stack_adapters, stacked_base_adapters
from qlora_kit.adapters import load_adapter as load_named_adapter
from qlora_kit.data import encode_prompt_ids
from qlora_kit.data.templates import has_chat_template
from qlora_kit.errors import QloraKitError
from qlora_kit.facts import PROMPT_TEMPLATES
from qlora_kit.loading import load_model, load_tokenizer, resolve_device, resolve_dtype
from qlora_kit.lora import lora_layers
from qlora_kit.lora_init import ResidualHook
from qlora_kit.models import resolve_model_dir
from qlora_kit.prequantized import bnb_quantization, is_nf4_double_quant
from qlora_kit.quant import NF4Linear

logger = logging.getLogger(__name__)

REQUANTIZE_NOTE = (
    "{model} is a merged qlora-kit export; --quantize re-quantizes its merged weights to NF4, which "
    "rounds away part of the fine-tune (the LoRA update is often smaller than one NF4 step). Without "
    "--quantize it loads dense, exactly as exported."
)


def check_prompt(prompt: str) -> None:
    """Refuse an empty or blank prompt: the model would be asked to continue nothing (a reshape error
    without a template, unrelated text with one)."""
    if not prompt.strip():
        raise QloraKitError(
            f"the prompt is empty{' (only whitespace)' if prompt else ''}: there is nothing to answer. "
            "Pass the text for the model with --prompt TEXT"
        )


def encode_prompt(tokenizer, prompt: str, template: str = "none", input_text: str = "") -> dict[str, torch.Tensor]:
    """Token ids (and attention mask) of ``prompt`` wrapped in ``template``, ready for ``model.generate``.

    ``auto`` is the tokenizer's chat template when it has one, else Alpaca. ``alpaca`` gives exactly the prompt
    ids training uses for an Alpaca row with this instruction and ``input_text`` (its ``input`` field).
    """
    check_prompt(prompt)
    if template == "auto":
        template = "chat" if has_chat_template(tokenizer) else "alpaca"
    if input_text and template != "alpaca":  # said in the CLI's words (encode_prompt_ids would refuse it too)
        raise QloraKitError(
            f"--input is the Alpaca format's input field; the {template!r} template has no place for it. "
            "Use --template alpaca, or put the text into --prompt"
        )
    # token for token a training prompt; the template's name and the tokenizer's chat template checked there
    ids = encode_prompt_ids(tokenizer, template, prompt, input_text)
    input_ids = torch.tensor([ids], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def generate_text(
    model: nn.Module,
    tokenizer,
    prompt: str,
    template: str = "none",
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 0.9,
    stream: bool = False,
    input_text: str = "",
) -> str:
    """The model's continuation of ``prompt`` (new text only). ``temperature=0`` is greedy decoding.

    The model is put in eval mode for the call (no LoRA dropout) and given back in the mode it was in.
    ``stream=True`` also prints the tokens to stdout as they come. ``input_text``: the Alpaca input field.
    """
    from transformers import GenerationConfig, TextStreamer

    if max_new_tokens <= 0:
        raise QloraKitError(f"max_new_tokens must be > 0, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise QloraKitError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature} and {top_p}")
    inputs = encode_prompt(tokenizer, prompt, template, input_text)
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in inputs.items()}
    eos = getattr(model.generation_config, "eos_token_id", None) or tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {}
    config = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad, **sampling)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            output = model.generate(**inputs, generation_config=config, streamer=streamer)
    finally:
        model.train(was_training)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


@torch.no_grad()
def fold_lora(model: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Replace every ``LoRALinear`` by a dense ``nn.Linear`` holding ``W + scaling * B @ A`` (``W`` dequantized;
    DoRA's and VeRA's layers merge by their own formulas, ``merged_weight``).

    The merge is computed in fp32 (as export does) and stored in ``dtype`` (default: the embeddings').
    Returns the number of layers folded.
    """
    dtype = dtype or model.get_input_embeddings().weight.dtype
    layers = lora_layers(model)
    for name, layer in layers.items():
        base = layer.base
        weight = base.dequantize(torch.float32) if isinstance(base, NF4Linear) else base.weight
        if not layer.disabled:
            weight = layer.merged_weight(weight)
        dense = nn.Linear(layer.in_features, layer.out_features, bias=base.bias is not None, device="meta")
        dense.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
        if base.bias is not None:
            dense.bias = nn.Parameter(base.bias.detach().to(dtype), requires_grad=False)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, dense)
    return len(layers)


def recorded_template(*directories: Path) -> str | None:
    """The prompt template recorded in the last of ``directories`` that records one (adapter over export)."""
    template = None
    for directory in directories:
        recorded = read_metadata(directory).get("template")
        if recorded is not None and recorded not in PROMPT_TEMPLATES:
            raise QloraKitError(
                f"{directory / METADATA_NAME} records the template {recorded!r}, which is not one of "
                f"{', '.join(PROMPT_TEMPLATES)}; fix or delete that file, or pass --template"
            )
        template = recorded or template
    return template


def _load_model(
    model_dir: Path,
    device: torch.device,
    dtype: torch.dtype,
    quantize: bool | None,
    has_adapter: bool,
    weight_hook: ResidualHook | None = None,
):
    """The model of ``model_dir``: dense for a merged export, NF4 for a base model, unless ``quantize`` says."""
    config_file = model_dir / "config.json"
    raw_config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    quantization = bnb_quantization(raw_config)
    if quantization is not None and not is_nf4_double_quant(quantization):
        # Other bitsandbytes formats (8-bit, FP4, ...): transformers' own loader, as they were saved.
        if has_adapter:
            raise QloraKitError(
                f"{model_dir} is a bitsandbytes checkpoint in a format qlora-kit's layers do not hold (only NF4 "
                "with double quantization); an adapter cannot be added to it here. Pass its 16-bit base model"
            )
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, device_map=str(device))
    is_export = read_metadata(model_dir).get("kind") == "export"
    if quantize is None:
        quantize = quantization is not None or not is_export
    elif quantize and is_export and quantization is None:
        logger.warning(REQUANTIZE_NOTE.format(model=model_dir))
    return load_model(model_dir, device=device, dtype=dtype, quantize=quantize, weight_hook=weight_hook)


def parse_adapter_specs(values: Sequence[str] | str | None) -> dict[str, Path]:
    """``--adapter`` values as name -> dir: ``NAME=DIR`` names one, a plain ``DIR`` is named ``default`` (the
    only one) or after its dir (several)."""
    if values is None:
        return {}
    values = [values] if isinstance(values, str) else list(values)
    specs: dict[str, Path] = {}
    for value in values:
        name, sep, directory = value.partition("=")
        if not sep or "/" in name or not name:  # a plain DIR (a path may hold '=' only after a '/')
            name, directory = (DEFAULT_NAME if len(values) == 1 else Path(value).name or value), value
        if name in specs:
            raise QloraKitError(f"--adapter: the name {name!r} is given twice; name each one: --adapter NAME=DIR")
        specs[name] = Path(directory)
    return specs


def load_for_generation(
    model: str,
    adapter: str | Sequence[str] | None,
    device: str,
    dtype: str,
    quantize: bool | None,
    merge_adapter: bool,
    use: str | None = None,
) -> tuple[nn.Module, object, str | None]:
    """The model (base + adapter, folded or not), its tokenizer and the recorded prompt template (or None),
    as ``qlora-kit generate`` uses them. ``quantize=None``: NF4 for base models, dense for merged exports.

    ``adapter``: one dir, or several ``NAME=DIR`` specs (``parse_adapter_specs``), all loaded on the one base
    (``qlora_kit.adapters``) with ``use`` (default: the first) active; switch with ``adapters.set_adapter``.
    """
    specs = parse_adapter_specs(adapter)
    if merge_adapter and not specs:
        raise QloraKitError("--merge-adapter needs --adapter DIR (an exported dir is already merged)")
    if merge_adapter and len(specs) > 1:
        raise QloraKitError(
            "--merge-adapter folds one adapter into the weights; with several, switching needs them apart"
        )
    if use is not None and use not in specs:
        raise QloraKitError(f"--use {use!r} is not one of the adapters given ({', '.join(specs) or 'none'})")
    model_dir = resolve_model_dir(model)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    # The adapters are read and checked before minutes of loading the model.
    read = {name: read_adapter(find_adapter_dir(path)) for name, path in specs.items()}
    use = use or next(iter(read), None)
    lora = read.get(use) if use is not None else None
    if len(read) > 1:
        check_switchable(read)
    template = recorded_template(model_dir, *([lora.directory] if lora is not None else []))
    # PiSSA/LoftQ alone: its base as training quantized it. Beside other adapters (which share the base) it
    # loads as PEFT's conversion over the original base, the same function up to the quantization error.
    pissa = lora is not None and len(read) == 1 and INIT_KEY in lora.metadata
    residual = ResidualHook(lora) if pissa else None
    loaded = _load_model(model_dir, torch_device, torch_dtype, quantize, lora is not None, residual)
    tokenizer_dir = model_dir
    if lora is not None:
        stack_adapters(loaded, stacked_base_adapters(lora))
        for name, one in read.items():
            load_named_adapter(loaded, one, name=name, dtype=torch_dtype, activate=name == use)
        if residual is not None:
            residual.keep_trained(loaded)
        if (lora.directory / "tokenizer_config.json").is_file():
            tokenizer_dir = lora.directory  # training may have saved its own tokenizer next to the adapter
        if merge_adapter:
            fold_lora(loaded, torch_dtype)
    return loaded.eval(), load_tokenizer(tokenizer_dir), template


def check_switchable(read: dict[str, Adapter]) -> None:
    """Adapters loaded side by side share the base exactly: refuse those that change it (a stack of frozen
    adapters under them)."""
    for name, one in read.items():
        if stacked_base_adapters(one):
            raise QloraKitError(
                f"adapter {name!r} ({one.directory}) was trained on top of other adapters (lora.base_adapters), "
                "which change the base every other adapter would see; load it alone"
            )
