"""New tokens and trainable embeddings (``qlora_kit.embeddings``): PEFT's layout both ways, tied models,
only the chosen rows train, resume, export, the planner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from qlora_kit.adapter import CONFIG_NAME, WEIGHTS_NAME, load_adapter, read_adapter, save_adapter
from qlora_kit.embeddings import (
    SavedEmbedding,
    SavedHead,
    TrainableTokens,
    TrainableTokensHead,
    add_trainable_embeddings,
    embedding_state_dict,
    is_tied,
    resize_vocab,
)
from qlora_kit.errors import QloraKitError
from qlora_kit.loading import load_model
from qlora_kit.lora import add_lora, lora_layers
from qlora_kit.quant import NF4Linear
from tests.conftest import save_tiny_checkpoint

VOCAB = 320
IDS = torch.tensor([[1, 17, 320, 42, 5, 321, 230, 7]])  # 320, 321: the two new tokens


def _base(tmp_path: Path, tied: bool) -> Path:
    return save_tiny_checkpoint(tmp_path / f"base-{tied}", tie_word_embeddings=tied)


def _trained(base: Path, tokens=(), modules_to_save=(), vocab: int = VOCAB + 2, seed: int = 1) -> nn.Module:
    """Our 4-bit model with LoRA on attention and the given trainable embeddings, all moved off their init."""
    model = load_model(base, device="cpu")
    add_lora(model, "attention", r=4, alpha=8, dropout=0.0)
    resize_vocab(model, vocab)
    add_trainable_embeddings(model, tokens, modules_to_save)
    torch.manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            nn.init.normal_(layer.lora_b.weight, std=0.3)
        for name, param in model.named_parameters():  # the embeddings' own (a tied one is listed once)
            if param.requires_grad and "lora_" not in name:
                param.add_(torch.randn_like(param) * 0.5)
    return model.eval()


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def _dense_reference(base: Path, ours: nn.Module, vocab: int) -> nn.Module:
    """transformers' model of ``base`` holding our dequantized weights, resized as a PEFT user would."""
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with torch.no_grad():
        for name, module in ours.named_modules():
            if isinstance(module, NF4Linear):
                reference.get_submodule(name.removesuffix(".base")).weight.copy_(module.dequantize())
    reference.resize_token_embeddings(vocab)
    return reference


CASES = [
    pytest.param(False, [5, 320, 321], [], id="untied-tokens"),
    pytest.param(True, [5, 320, 321], [], id="tied-tokens"),
    pytest.param(False, [], ["embed_tokens", "lm_head"], id="untied-modules"),
    pytest.param(True, [], ["embed_tokens"], id="tied-modules"),
    pytest.param(False, [320, 321], ["embed_tokens"], id="untied-embed-saved-head-tokens"),
]


@pytest.mark.parametrize("tied, tokens, modules", CASES)
def test_peft_loads_our_trainable_embeddings_and_we_load_them_back(tmp_path, tied, tokens, modules):
    from peft import PeftModel

    base = _base(tmp_path, tied)
    ours = _trained(base, tokens, modules)
    adapter = save_adapter(ours, tmp_path / "adapter", str(base))
    expected = _logits(ours)
    theirs = PeftModel.from_pretrained(_dense_reference(base, ours, VOCAB + 2), adapter).eval()
    torch.testing.assert_close(_logits(theirs), expected, rtol=0, atol=1e-4)

    config = json.loads((adapter / CONFIG_NAME).read_text())
    if tokens:
        sides = ["embed_tokens"] if tied else [s for s in ("embed_tokens", "lm_head") if s not in modules]
        assert config["trainable_token_indices"] == {side: tokens for side in sides}
    assert config["modules_to_save"] == (["embed_tokens", "lm_head"] if tied and modules else modules or None)
    assert config["ensure_weight_tying"] is (tied and bool(modules))

    again = load_model(base, device="cpu")  # our loader: resizes, wraps, loads
    load_adapter(again, adapter)
    assert torch.equal(_logits(again.eval()), expected)
    assert is_tied(again) == tied  # tied stays tied


def test_tied_model_shares_one_delta_and_untied_trains_the_heads_rows_too(tmp_path):
    tied = _trained(_base(tmp_path, True), [5, 320])
    embed, head = tied.get_input_embeddings(), tied.get_output_embeddings()
    assert isinstance(embed, TrainableTokens) and isinstance(head, TrainableTokensHead)
    assert head.trainable_tokens_delta is embed.trainable_tokens_delta
    assert [n for n, p in tied.named_parameters() if p.requires_grad and "lora" not in n] == [
        "model.embed_tokens.trainable_tokens_delta"
    ]
    state = embedding_state_dict(tied)
    assert list(state) == ["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"]
    untied = _trained(_base(tmp_path, False), [5, 320])
    assert set(embedding_state_dict(untied)) == {
        "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta",
        "base_model.model.lm_head.token_adapter.trainable_tokens_delta",
    }
    saved = _trained(_base(tmp_path, True), [], ["lm_head"])  # tied: saving either saves the one matrix
    assert isinstance(saved.get_input_embeddings(), SavedEmbedding) and isinstance(saved.lm_head, SavedHead)
    assert saved.get_input_embeddings().weight is saved.lm_head.weight


def test_only_the_chosen_rows_change_in_training_steps(tmp_path):
    from qlora_kit.loss import causal_lm_loss

    model = _trained(_base(tmp_path, True), [5, 320], seed=2)
    model.train()
    embed = model.get_input_embeddings()
    before = {"base": embed.base.weight.detach().clone(), "delta": embed.trainable_tokens_delta.detach().clone()}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    batch = {"input_ids": IDS, "attention_mask": torch.ones_like(IDS), "labels": IDS}
    for _ in range(3):
        loss, _ = causal_lm_loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert torch.equal(embed.base.weight, before["base"])  # every other row is the base's, untouched
    assert not torch.equal(embed.trainable_tokens_delta, before["delta"])  # both chosen rows moved
    assert (embed.trainable_tokens_delta - before["delta"]).abs().sum(1).min() > 0
    ids = torch.tensor([[1, 17, 42]])  # no chosen token in the input: only the head's rows 5 and 320 differ
    with torch.no_grad():
        moved = model(ids).logits - _without_tokens(model)(ids).logits
    changed = (moved.abs() > 0).any(dim=(0, 1)).nonzero().flatten().tolist()
    assert changed == [5, 320]


def _without_tokens(model: nn.Module) -> nn.Module:
    """The same model with the token rows switched back to the base's (the wrappers' bases put back)."""
    import copy

    bare = copy.deepcopy(model)
    bare.model.embed_tokens = bare.model.embed_tokens.base
    bare.lm_head = bare.lm_head.base
    return bare


def test_bad_embedding_settings_are_refused_and_nothing_is_changed(tmp_path):
    base = _base(tmp_path, False)
    model = load_model(base, device="cpu")
    add_lora(model, "attention", r=2)
    with pytest.raises(QloraKitError, match=r"modules_to_save: \['norm'\] cannot be trained in full"):
        add_trainable_embeddings(model, [], ["norm"])
    with pytest.raises(QloraKitError, match=r"token ids \[400\] are outside the vocabulary \(0..319\)"):
        add_trainable_embeddings(model, [5, 400])
    assert isinstance(model.get_input_embeddings(), nn.Embedding) and not embedding_state_dict(model)
    adapter = save_adapter(_trained(base, [5, 320]), tmp_path / "adapter", str(base))
    config = json.loads((adapter / CONFIG_NAME).read_text())
    (adapter / CONFIG_NAME).write_text(json.dumps({**config, "modules_to_save": ["norm"]}))
    with pytest.raises(QloraKitError, match=r"name \['norm'\]; qlora-kit trains"):
        read_adapter(adapter)
    (adapter / CONFIG_NAME).write_text(json.dumps({**config, "trainable_token_indices": {"lm_head": [5, 320]}}))
    with pytest.raises(QloraKitError, match=r"unexpected tensor .*embed_tokens\.token_adapter"):
        read_adapter(adapter)
    state = load_file(adapter / WEIGHTS_NAME)
    assert len(state) == 2 * 4 * 2 + 2


@pytest.mark.parametrize("tied, tokens, modules", CASES)
def test_export_merges_the_embeddings_with_the_grown_vocabulary(tmp_path, tied, tokens, modules):
    from qlora_kit.export import export_merged

    base = _base(tmp_path, tied)
    ours = _trained(base, tokens, modules)
    adapter = save_adapter(ours, tmp_path / "adapter", str(base))
    out = export_merged(adapter, tmp_path / "merged", dtype="fp32", device="cpu")
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == VOCAB + 2 and config["tie_word_embeddings"] is tied
    dense = load_model(out, device="cpu", quantize=False)
    torch.testing.assert_close(_logits(dense), _logits(ours), rtol=0, atol=1e-4)


def test_a_tied_model_refuses_two_different_saved_matrices(tmp_path):
    base = _base(tmp_path, True)
    adapter = save_adapter(_trained(base, [], ["embed_tokens"]), tmp_path / "adapter", str(base))
    state = load_file(adapter / WEIGHTS_NAME)
    state["base_model.model.lm_head.weight"] = state["base_model.model.lm_head.weight"] + 1
    from safetensors.torch import save_file

    save_file(state, adapter / WEIGHTS_NAME)
    with pytest.raises(QloraKitError, match="ties lm_head to embed_tokens, and the adapter saved them as two"):
        load_adapter(load_model(base, device="cpu"), adapter)


@pytest.fixture
def tokenizer_model(tmp_path: Path, smollm2_dir: Path, request) -> Path:
    """A tiny Llama with SmolLM2's tokenizer, tied (as SmolLM2) or not."""
    from tests.test_generate import with_tokenizer

    path = save_tiny_checkpoint(
        tmp_path / "tiny", vocab_size=49152, hidden_size=64, intermediate_size=96, tie_word_embeddings=request.param
    )
    return with_tokenizer(path, smollm2_dir)


RUNS = [
    pytest.param(True, ["<|tool|>", "<|im_start|>"], [], id="tied-tokens"),
    pytest.param(False, ["<|tool|>"], ["embed_tokens"], id="untied-saved-embed-head-tokens"),
]


@pytest.mark.parametrize("tokenizer_model, tokens, modules", [p.values for p in RUNS], indirect=["tokenizer_model"])
def test_training_with_new_tokens_saves_tokenizer_resumes_exactly_and_generates(
    tokenizer_model, tmp_path, tokens, modules, caplog
):
    from qlora_kit.config import load_config
    from qlora_kit.generate import load_for_generation
    from qlora_kit.train import train
    from tests.test_train import TOOLS, _overrides

    def run(out: Path, steps: int, save_steps: int) -> Path:
        extra = {"lora.trainable_tokens": json.dumps(tokens), "lora.modules_to_save": json.dumps(modules)}
        extra |= {"train.max_steps": steps, "train.save_steps": save_steps, "train.lr_scheduler": "constant"}
        recipe = TOOLS.parent / "smollm2_alpaca.yaml"
        assert train(load_config(recipe, _overrides(tokenizer_model, out, **extra))).status == "completed"
        return out / "adapter"

    whole = run(tmp_path / "whole", 3, 0)
    run(tmp_path / "split", 2, 1)
    caplog.clear()
    with caplog.at_level("INFO", logger="qlora_kit"):
        split = run(tmp_path / "split", 3, 1)  # resumes from step 2 (train.resume=auto)
    assert "resumed from" in caplog.text and "at step 2/3" in caplog.text
    for key, tensor in load_file(whole / WEIGHTS_NAME).items():
        assert torch.equal(tensor, load_file(split / WEIGHTS_NAME)[key]), key

    from qlora_kit.loading import load_tokenizer

    tokenizer = load_tokenizer(whole)  # the adapter's own tokenizer holds the new token
    new_id = tokenizer.convert_tokens_to_ids("<|tool|>")
    assert new_id == 49152 and tokenizer("say <|tool|> now")["input_ids"].count(new_id) == 1
    config = json.loads((whole / CONFIG_NAME).read_text())
    ids = tokenizer.convert_tokens_to_ids(tokens)
    assert sorted(ids) == next(iter(config["trainable_token_indices"].values()))
    model, loaded_tokenizer, _ = load_for_generation(str(tokenizer_model), str(whole), "cpu", "fp32", None, False)
    assert len(loaded_tokenizer) == 49153 and model.get_input_embeddings().weight.shape[0] == 49153
    with torch.no_grad():
        logits = model(torch.tensor([[1, new_id, 5]])).logits
    assert logits.shape[-1] == 49153 and torch.isfinite(logits).all()


def test_an_adapter_with_embeddings_switches_off_and_on_and_is_loaded_alone(tmp_path):
    from qlora_kit import adapters

    base = _base(tmp_path, True)
    ours = _trained(base, [5, 320, 321])  # every new token trained, as a run's are
    adapter = save_adapter(ours, tmp_path / "adapter", str(base))
    plain = save_adapter(_plain_lora(base), tmp_path / "plain", str(base))
    model = load_model(base, device="cpu")
    ids = IDS[:, [0, 1, 3, 6]]  # tokens of the base vocabulary
    with torch.no_grad():
        bare = model(ids).logits
    adapters.load_adapter(model, adapter, name="tokens")
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, _logits(ours))
        adapters.disable_adapters(model)  # the bare embeddings, in the grown vocabulary
        assert not isinstance(model.get_input_embeddings(), TrainableTokens)
        torch.testing.assert_close(model(ids).logits[..., :VOCAB], bare, rtol=0, atol=1e-6)
        adapters.set_adapter(model, "tokens")
        assert torch.equal(model(IDS).logits, _logits(ours))
    with pytest.raises(QloraKitError, match=r"'tokens' trains embeddings .* load it alone"):
        adapters.load_adapter(model, plain, name="plain")
    assert adapters.adapter_names(model) == ["tokens"] and adapters.active_adapter(model) == "tokens"


def _plain_lora(base: Path) -> nn.Module:
    model = load_model(base, device="cpu")
    add_lora(model, "attention", r=2)
    return model


@pytest.mark.parametrize("tied, tokens, modules", CASES)
def test_the_plan_counts_the_trainable_embeddings_as_the_model_holds_them(tmp_path, tied, tokens, modules):
    from qlora_kit.memory import plan_memory
    from qlora_kit.memory.shapes import checkpoint_shape

    base = _base(tmp_path, tied)
    tokens = list(range(10, 10 + len(tokens)))  # as many tokens, in the checkpoint's vocabulary (the plan's)
    model = _trained(base, tokens, modules, vocab=VOCAB)
    model.train()
    params = list({id(p): p for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}.values())
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    for param in params:
        param.grad = torch.zeros_like(param)
    optimizer.step()
    states = sum(t.numel() * t.element_size() for st in optimizer.state.values() for t in st.values() if t.dim())
    plan = plan_memory(
        checkpoint_shape(str(base)),
        rank=4,
        targets="attention",
        device="cpu",
        trainable_tokens=len(tokens),
        modules_to_save=modules,
    )
    rows = {row.item: row.bytes for row in plan.rows}
    assert rows["trainable embeddings"] == sum(p.numel() * p.element_size() for p in params)
    assert rows["embedding gradients"] == rows["trainable embeddings"]
    assert rows["embedding optimizer states"] == states
    assert "trainable head in the loss" in rows  # every case here trains the head (its rows, or all of it)
    plain = plan_memory(checkpoint_shape(str(base)), rank=4, targets="attention", device="cpu")
    assert plan.total > plain.total and not any("embedding" in row.item for row in plain.rows)
    with pytest.raises(QloraKitError, match="modules_to_save may hold embed_tokens, lm_head, not \\['norm'\\]"):
        plan_memory(checkpoint_shape(str(base)), device="cpu", modules_to_save=["norm"])


def test_bad_recipe_values_are_named_and_a_missing_base_adapter_stops_before_any_output(tmp_path, smollm2_dir):
    from qlora_kit.config import load_config
    from qlora_kit.train import train
    from tests.test_train import TOOLS, _overrides

    recipe = TOOLS.parent / "smollm2_alpaca.yaml"
    bad = {"lora.modules_to_save": "[norm]", "lora.trainable_tokens": '["<x>", "<x>"]'}
    with pytest.raises(QloraKitError) as err:
        load_config(recipe, _overrides(smollm2_dir, tmp_path / "run", **bad))
    message = str(err.value)
    assert "lora.modules_to_save = ['norm']: allowed entries: embed_tokens, lm_head" in message
    assert "lora.trainable_tokens = ['<x>', '<x>']: must be a list of distinct non-empty tokens" in message
    missing = {"lora.base_adapters": f"[{tmp_path / 'gone'}]", "train.max_steps": 1}
    with pytest.raises(QloraKitError, match=r"gone does not exist; pass a training run dir or an adapter dir"):
        train(load_config(recipe, _overrides(smollm2_dir, tmp_path / "run", **missing)))
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_smollm2_tied_new_tokens_load_in_peft_with_our_logits(smollm2_dir, tmp_path):
    """SmolLM2 ties lm_head to embed_tokens: a new token's one trained row serves both, and PEFT agrees."""
    from peft import PeftModel

    from qlora_kit.embeddings import add_tokens
    from qlora_kit.loading import load_tokenizer

    tokenizer = load_tokenizer(smollm2_dir)
    ids = add_tokens(tokenizer, ["<|tool|>", "<|im_start|>"])
    assert ids[0] == len(tokenizer) - 1 and ids[1] < ids[0]
    model = load_model(smollm2_dir, device="cpu")
    add_lora(model, "attention", r=4, alpha=8, dropout=0.0)
    resize_vocab(model, len(tokenizer))
    add_trainable_embeddings(model, ids)
    assert is_tied(model)
    torch.manual_seed(0)
    with torch.no_grad():
        model.get_input_embeddings().trainable_tokens_delta.add_(torch.randn(2, 576) * 0.05)
        for layer in lora_layers(model).values():
            nn.init.normal_(layer.lora_b.weight, std=0.02)
    adapter = save_adapter(model.eval(), tmp_path / "adapter", str(smollm2_dir), tokenizer=tokenizer)
    prompt = torch.tensor([tokenizer("Call <|tool|> then <|im_start|>")["input_ids"]])
    with torch.no_grad():
        ours = model(prompt).logits
    theirs = PeftModel.from_pretrained(_dense_reference(smollm2_dir, model, len(tokenizer)), adapter).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(prompt).logits, ours, rtol=0, atol=1e-4)
    assert load_tokenizer(adapter).convert_tokens_to_ids("<|tool|>") == ids[0]


@pytest.mark.parametrize(
    "tied, peft_kwargs",
    [
        pytest.param(False, {"trainable_token_indices": [5, 7]}, id="untied-tokens-input-side-only"),
        pytest.param(True, {"trainable_token_indices": {"embed_tokens": [5, 7]}}, id="tied-tokens"),
        pytest.param(False, {"modules_to_save": ["lm_head"]}, id="untied-head-in-full"),
    ],
)
def test_we_load_peft_written_trainable_embeddings(tmp_path, tied, peft_kwargs):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = _base(tmp_path, tied)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, **peft_kwargs)
    theirs = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), config)
    torch.manual_seed(4)
    with torch.no_grad():
        for param in theirs.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.3)
    theirs.save_pretrained(tmp_path / "peft")
    ours = load_model(base, device="cpu", quantize=False)
    load_adapter(ours, tmp_path / "peft")
    ids = IDS[:, [0, 1, 3, 4, 6, 7]]  # the base vocabulary (PEFT's adapter adds no tokens)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(ids).logits, theirs.eval()(ids).logits, rtol=0, atol=1e-5)
