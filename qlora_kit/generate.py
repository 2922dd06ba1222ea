"""Text generation with a base model + adapter (or an exported merged dir), greedy or sampled, streamed.

``generate_text`` is the library call (the trainer's before/after samples use it); ``generate_main`` is
``qlora-kit generate``. By default the base model is loaded in NF4 and the adapter stays a separate LoRA
path, exactly the training-time model. ``--merge-adapter`` folds each adapted layer into one dense
``nn.Linear`` holding ``dequant(W_nf4) + scaling * B @ A`` in the compute dtype: NF4 codes cannot absorb
the update without re-quantizing (which would change the model), so folding trades memory for speed, with
those layers' weights taking 16/32 bits per value instead of about 4.1, and one matmul per layer instead
of a dequantize plus three.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

from qlora_kit.adapter import CONFIG_NAME, load_adapter
from qlora_kit.errors import QloraKitError
from qlora_kit.loading import load_model, load_tokenizer, resolve_device, resolve_dtype
from qlora_kit.lora import lora_layers, merge_lora_weight
from qlora_kit.models import resolve_model_dir
from qlora_kit.quant import NF4Linear

TEMPLATES = ("auto", "alpaca", "chat", "none")


def encode_prompt(tokenizer, prompt: str, template: str = "none") -> dict[str, torch.Tensor]:
    """Token ids (and attention mask) of ``prompt`` wrapped in ``template``, ready for ``model.generate``.

    ``auto`` is the tokenizer's chat template when it has one, else Alpaca.
    """
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if template == "auto":
        template = "chat" if has_chat else "alpaca"
    if template == "chat":
        if not has_chat:
            raise QloraKitError(
                "--template chat needs a tokenizer with a chat template; this one has none. "
                "Use --template alpaca or none"
            )
        messages = [{"role": "user", "content": prompt}]
        encoded = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_dict=True, return_tensors="pt"
        )
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
    if template == "alpaca":
        from qlora_kit.data import alpaca_prompt  # the exact text training formats Alpaca rows with

        prompt = alpaca_prompt(prompt)
    elif template != "none":
        raise QloraKitError(f"unknown template {template!r}; use one of {', '.join(TEMPLATES)}")
    encoded = tokenizer(prompt, return_tensors="pt")
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def generate_text(
    model: nn.Module,
    tokenizer,
    prompt: str,
    template: str = "none",
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 0.9,
    stream: bool = False,
) -> str:
    """The model's continuation of ``prompt`` (new text only). ``temperature=0`` is greedy decoding.

    The model is put in eval mode for the call (no LoRA dropout) and given back in the mode it was in.
    ``stream=True`` also prints the tokens to stdout as they come.
    """
    from transformers import GenerationConfig, TextStreamer

    if max_new_tokens <= 0:
        raise QloraKitError(f"max_new_tokens must be > 0, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise QloraKitError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature} and {top_p}")
    inputs = encode_prompt(tokenizer, prompt, template)
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
    """Replace every ``LoRALinear`` by a dense ``nn.Linear`` holding ``W + scaling * B @ A`` (``W`` dequantized).

    The merge is computed in fp32 (as export does) and stored in ``dtype`` (default: the embeddings').
    Returns the number of layers folded.
    """
    dtype = dtype or model.get_input_embeddings().weight.dtype
    layers = lora_layers(model)
    for name, layer in layers.items():
        base = layer.base
        weight = base.dequantize(torch.float32) if isinstance(base, NF4Linear) else base.weight
        if not layer.disabled:
            weight = merge_lora_weight(weight, layer.lora_a.weight, layer.lora_b.weight, layer.scaling)
        dense = nn.Linear(layer.in_features, layer.out_features, bias=base.bias is not None, device="meta")
        dense.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
        if base.bias is not None:
            dense.bias = nn.Parameter(base.bias.detach().to(dtype), requires_grad=False)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, dense)
    return len(layers)


def _is_bnb_checkpoint(model_dir: Path) -> bool:
    """A dir written by ``qlora-kit export --quantize nf4`` (or any bitsandbytes-quantized save)."""
    config = json.loads((model_dir / "config.json").read_text()) if (model_dir / "config.json").is_file() else {}
    return (config.get("quantization_config") or {}).get("quant_method") == "bitsandbytes"


def load_for_generation(
    model: str, adapter: str | None, device: str, dtype: str, quantize: bool, merge_adapter: bool
) -> tuple[nn.Module, object]:
    """The model (base + adapter, folded or not) and its tokenizer, as ``qlora-kit generate`` uses them."""
    if merge_adapter and adapter is None:
        raise QloraKitError("--merge-adapter needs --adapter DIR (an exported dir is already merged)")
    model_dir = resolve_model_dir(model)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    if _is_bnb_checkpoint(model_dir):
        if adapter is not None:
            raise QloraKitError(
                f"{model_dir} is already a bitsandbytes 4-bit checkpoint; an adapter cannot be added to it here. "
                "Merge the adapter at export time, or pass the 16-bit base model with --adapter"
            )
        from transformers import AutoModelForCausalLM

        loaded = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype, device_map=str(torch_device))
    else:
        loaded = load_model(model_dir, device=torch_device, dtype=torch_dtype, quantize=quantize)
    tokenizer_dir = model_dir
    if adapter is not None:
        adapter_dir = Path(adapter)
        if not (adapter_dir / CONFIG_NAME).is_file() and (adapter_dir / "adapter" / CONFIG_NAME).is_file():
            adapter_dir = adapter_dir / "adapter"  # a training run dir
        load_adapter(loaded, adapter_dir, dtype=torch_dtype)
        if (adapter_dir / "tokenizer_config.json").is_file():
            tokenizer_dir = adapter_dir  # training may have saved its own tokenizer next to the adapter
        if merge_adapter:
            fold_lora(loaded, torch_dtype)
    return loaded.eval(), load_tokenizer(tokenizer_dir)


def generate_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="qlora-kit generate",
        description="Generate text with a base model + LoRA adapter, or an exported merged model.",
    )
    parser.add_argument("--model", required=True, help="base model or exported dir: path, hub id or short id")
    parser.add_argument("--adapter", default=None, help="adapter dir (or training run dir) to apply")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="one prompt; the answer is streamed to the terminal")
    source.add_argument("--interactive", action="store_true", help="read prompts from stdin until EOF or 'exit'")
    parser.add_argument(
        "--template",
        default="auto",
        choices=TEMPLATES,
        help="prompt format: alpaca, chat (the tokenizer's chat template), none (raw text); "
        "auto (default) is chat when the tokenizer has a chat template, else alpaca",
    )
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy decoding")
    parser.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling (with --temperature > 0)")
    parser.add_argument(
        "--merge-adapter",
        action="store_true",
        help="fold the adapter into dense layers (dequantized weight + scaled B@A in the compute dtype): "
        "faster generation, 4-8x the memory of those layers",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default="auto", help="compute dtype: auto, bf16, fp16, fp32")
    parser.add_argument(
        "--quantize",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="load the model's decoder linears in NF4 (default); --no-quantize loads them dense",
    )
    args = parser.parse_args(argv)
    model, tokenizer = load_for_generation(
        args.model, args.adapter, args.device, args.dtype, args.quantize, args.merge_adapter
    )

    def answer(prompt: str) -> None:
        generate_text(
            model, tokenizer, prompt, args.template, args.max_new_tokens, args.temperature, args.top_p, stream=True
        )

    if args.prompt is not None:
        answer(args.prompt)
        return 0
    print("Type a prompt and press Enter; 'exit' or Ctrl-D quits.")
    while True:
        try:
            prompt = input(">>> ")
        except EOFError:
            print()
            return 0
        if prompt.strip() in {"exit", "quit"}:
            return 0
        if prompt.strip():
            answer(prompt)
