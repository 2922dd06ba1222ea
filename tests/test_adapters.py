"""Many adapters on one base (``qlora_kit.adapters``): load, switch, disable; stacking a frozen adapter under a
new one and exporting the sum."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from qlora_kit import adapters
from qlora_kit.adapter import load_adapter as load_single
from qlora_kit.adapter import save_adapter
from qlora_kit.errors import QloraKitError
from qlora_kit.loading import load_model
from qlora_kit.lora import LoRALinear, add_lora, lora_layers
from qlora_kit.quant import NF4Linear
from tests.conftest import save_tiny_checkpoint

IDS = torch.tensor([[1, 17, 42, 99, 5, 230, 7]])


@pytest.fixture
def base(tmp_path: Path) -> Path:
    return save_tiny_checkpoint(tmp_path / "base")


def _save_random_adapter(base: Path, out: Path, seed: int, targets="all-linear", r: int = 4) -> Path:
    model = load_model(base, device="cpu")
    add_lora(model, targets, r=r, alpha=2.0 * r, dropout=0.1)
    torch.manual_seed(seed)
    for layer in lora_layers(model).values():
        nn.init.normal_(layer.lora_b.weight, std=0.3)
    return save_adapter(model, out, str(base))


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture
def two(base: Path, tmp_path: Path) -> tuple[Path, Path]:
    a = _save_random_adapter(base, tmp_path / "a", seed=1)
    b = _save_random_adapter(base, tmp_path / "b", seed=2, targets=["q_proj", "v_proj"], r=8)
    return a, b


def _alone(base: Path, adapter: Path | None) -> torch.Tensor:
    model = load_model(base, device="cpu")
    if adapter is not None:
        load_single(model, adapter)
    return _logits(model.eval())  # LoRALinear is made in training mode (dropout on): eval as generate does


def test_two_adapters_switch_and_disable_give_each_ones_own_logits_and_the_bases(base, two):
    a, b = two
    expected = {"a": _alone(base, a), "b": _alone(base, b), None: _alone(base, None)}
    assert not torch.allclose(expected["a"], expected["b"]) and not torch.allclose(expected["a"], expected[None])

    model = load_model(base, device="cpu")
    nf4 = {name: module for name, module in model.named_modules() if isinstance(module, NF4Linear)}
    codes = {name: module.codes.data_ptr() for name, module in nf4.items()}
    adapters.load_adapter(model, a, name="a")
    adapters.load_adapter(model, b, name="b")
    assert adapters.adapter_names(model) == ["a", "b"] and adapters.active_adapter(model) == "a"
    for name in ["a", "b", None, "b", "a", None, "a"]:
        if name is None:
            adapters.disable_adapters(model)
            assert not lora_layers(model)
        else:
            adapters.set_adapter(model, name)
        assert adapters.active_adapter(model) == name
        assert torch.equal(_logits(model), expected[name]), name
    # the base was never reloaded nor copied: the very same NF4 modules and code storage throughout
    for layer_name, module in nf4.items():
        current = model.get_submodule(layer_name)
        assert (current.base if isinstance(current, LoRALinear) else current) is module
        assert module.codes.data_ptr() == codes[layer_name]
    wrappers = adapters.registry(model).wrappers
    assert (
        wrappers["b"]["model.layers.0.self_attn.q_proj"].base is wrappers["a"]["model.layers.0.self_attn.q_proj"].base
    )


def test_each_extra_adapter_costs_exactly_its_own_tensors(base, two):
    a, b = two
    model = load_model(base, device="cpu")

    def all_bytes() -> int:  # every distinct tensor storage reachable from the model and its registry
        seen, total = set(), 0
        modules = [model, *(w for ws in adapters.registry(model).wrappers.values() for w in ws.values())]
        for module in modules:
            for tensor in (*module.parameters(), *module.buffers()):
                if tensor.untyped_storage().data_ptr() not in seen:
                    seen.add(tensor.untyped_storage().data_ptr())
                    total += tensor.untyped_storage().nbytes()
        return total

    bare = all_bytes()
    adapters.load_adapter(model, a, name="a")
    with_a = all_bytes()
    adapters.load_adapter(model, b, name="b")
    with_both = all_bytes()
    own = {name: sum(t.numel() * t.element_size() for t in load_file_tensors(path)) for name, path in two_named(two)}
    assert with_a - bare == own["a"] == adapters.adapter_bytes(model, "a")
    assert with_both - with_a == own["b"] == adapters.adapter_bytes(model, "b")
    # r=8 on q/v of 2 layers: A 8x128 + B 8x128 (q), A 8x128 + B 8x64 (v: 2 kv heads x 32), fp32
    assert own["b"] == 2 * 4 * (8 * 128 + 128 * 8 + 8 * 128 + 64 * 8)


def two_named(two: tuple[Path, Path]) -> list[tuple[str, Path]]:
    return list(zip(("a", "b"), two, strict=True))


def load_file_tensors(adapter: Path) -> list[torch.Tensor]:
    from safetensors.torch import load_file

    return list(load_file(adapter / "adapter_model.safetensors").values())


def test_loaded_inactive_adapter_leaves_the_active_one_and_modes_follow_the_model(base, two):
    a, b = two
    model = load_model(base, device="cpu")
    adapters.load_adapter(model, a, name="a")
    adapters.disable_adapters(model)
    adapters.load_adapter(model, b, name="b")  # not the first: loaded, not switched in
    assert adapters.active_adapter(model) is None and not lora_layers(model)
    model.train()
    adapters.set_adapter(model, "b")
    assert all(layer.training for layer in lora_layers(model).values())
    model.eval()
    adapters.set_adapter(model, "a")
    assert not any(layer.training for layer in lora_layers(model).values())
    adapters.set_adapter(model, "b")  # b was switched out in training mode: all of it (dropout too) follows
    assert not any(module.training for module in model.modules())
    model.train()
    adapters.set_adapter(model, "a")
    assert all(module.training for module in model.modules())


def test_bad_names_and_stray_layers_are_refused_and_nothing_is_lost(base, two):
    a, b = two
    model = load_model(base, device="cpu")
    adapters.load_adapter(model, a, name="a")
    before = _logits(model)
    with pytest.raises(QloraKitError, match="already loaded"):
        adapters.load_adapter(model, b, name="a")
    with pytest.raises(QloraKitError, match="no adapter named 'c' is loaded \\(loaded: a\\)"):
        adapters.set_adapter(model, "c")
    with pytest.raises(QloraKitError, match="means 'no adapter'"):
        adapters.load_adapter(model, b, name="off")
    other = save_tiny_checkpoint(base.parent / "other", hidden_size=64, intermediate_size=96)
    foreign = _save_random_adapter(other, base.parent / "foreign", seed=3)
    with pytest.raises(QloraKitError, match="the adapter was trained on a different base model"):
        adapters.load_adapter(model, foreign, name="foreign")
    assert adapters.adapter_names(model) == ["a"] and "foreign" not in str(model)
    assert adapters.active_adapter(model) == "a" and torch.equal(_logits(model), before)
    adapters.disable_adapters(model)
    assert not lora_layers(model)

    stray = load_model(base, device="cpu")
    add_lora(stray, "attention", r=2)
    with pytest.raises(QloraKitError, match=r"LoRA layers outside qlora_kit\.adapters"):
        adapters.load_adapter(stray, a, name="a")


@pytest.fixture
def tiny_dir(tmp_path: Path, smollm2_dir: Path) -> Path:
    """A tiny Llama with SmolLM2's tokenizer (generate needs one)."""
    from tests.test_generate import with_tokenizer

    path = save_tiny_checkpoint(tmp_path / "tiny", vocab_size=49152, hidden_size=64, intermediate_size=96)
    return with_tokenizer(path, smollm2_dir)


def test_generate_cli_loads_several_adapters_uses_one_and_switches_interactively(
    tiny_dir, tmp_path, capsys, monkeypatch
):
    from qlora_kit.cli import generate_main
    from qlora_kit.generate import generate_text
    from qlora_kit.loading import load_tokenizer

    a = _save_random_adapter(tiny_dir, tmp_path / "a", seed=1)
    b = _save_random_adapter(tiny_dir, tmp_path / "b", seed=2, targets="attention")
    tokenizer = load_tokenizer(tiny_dir)

    def alone(adapter: Path | None) -> str:
        model = load_model(tiny_dir, device="cpu")
        if adapter is not None:
            load_single(model, adapter)
        return generate_text(model, tokenizer, "Hello there", "none", max_new_tokens=5)

    answers = {"a": alone(a), "b": alone(b), "off": alone(None)}
    assert len(set(answers.values())) == 3, "the test needs three different answers"
    common = ["--model", str(tiny_dir), "--adapter", f"a={a}", "--adapter", f"b={b}", "--template", "none"]
    common += ["--max-new-tokens", "5", "--device", "cpu"]
    capsys.readouterr()
    assert generate_main([*common, "--use", "b", "--prompt", "Hello there"]) == 0
    assert capsys.readouterr().out == answers["b"] + "\n"

    script = "Hello there\n/adapter\n/adapter b\nHello there\n/adapter off\nHello there\n/adapter zz\n/adapter a\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(script + "Hello there\nexit\n"))
    assert generate_main([*common, "--interactive"]) == 0
    out = capsys.readouterr().out
    assert "adapters: a, b; active: a" in out and "no adapter named 'zz'; loaded: a, b (or off)" in out
    said = [line.removeprefix(">>> ") for line in out.splitlines() if line.startswith(">>> ") and line[4:].strip()]
    said = [line for line in said if not line.startswith(("adapter", "no adapter"))]
    assert said == [answers["a"], answers["b"], answers["off"], answers["a"]]

    with pytest.raises(QloraKitError, match=r"--use 'c' is not one of the adapters given \(a, b\)"):
        generate_main([*common, "--use", "c", "--prompt", "x"])
    with pytest.raises(QloraKitError, match="the name 'a' is given twice"):
        generate_main([*common, "--adapter", f"a={b}", "--prompt", "x"])
    with pytest.raises(QloraKitError, match="--merge-adapter folds one adapter"):
        generate_main([*common, "--merge-adapter", "--prompt", "x"])


# --- stacking: a new adapter trained over a frozen one -------------------------------------------------------


def test_stacked_adapter_exports_and_generates_the_sum_it_trained_on(tiny_dir, tmp_path):
    base = tiny_dir  # generate loads its tokenizer
    from safetensors.torch import load_file

    from qlora_kit.adapter import read_adapter
    from qlora_kit.export import export_merged
    from qlora_kit.generate import load_for_generation
    from qlora_kit.lora import lora_scaling

    first = _save_random_adapter(base, tmp_path / "first", seed=1)
    model = load_model(base, device="cpu")
    stacked_dirs = adapters.stack_adapters(model, [first])
    assert stacked_dirs == [first.resolve()]
    report = add_lora(model, "attention", r=2, alpha=4.0, dropout=0.0)
    assert report.trainable_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert report.trainable_params == sum(t.numel() for t in lora_state_dict_of(model).values())  # frozen: buffers
    torch.manual_seed(3)
    for layer in lora_layers(model).values():
        nn.init.normal_(layer.lora_b.weight, std=0.3)
    second = save_adapter(model, tmp_path / "second", str(base), adapters.stack_record([first]))
    trained = _logits(model.eval())

    out = export_merged(second, tmp_path / "merged", dtype="fp32", device="cpu")
    merged = load_file(out / "model.safetensors")
    one, two = read_adapter(first), read_adapter(second)
    s1, s2 = (lora_scaling(a.config.lora_alpha, a.config.r) for a in (one, two))
    fresh = load_model(base, device="cpu")
    for name, (a1, b1) in one.pairs().items():
        expected = torch.addmm(fresh.get_submodule(name).dequantize(torch.float32), b1, a1, alpha=s1)
        if name in two.pairs():
            a2, b2 = two.pairs()[name]
            expected = torch.addmm(expected, b2, a2, alpha=s2)
        assert torch.equal(merged[f"{name}.weight"], expected), name
    assert set(two.pairs()) < set(one.pairs())  # q/k/v/o carry both deltas, the MLP only the frozen one

    dense = load_model(out, device="cpu", quantize=False)
    torch.testing.assert_close(_logits(dense), trained, rtol=0, atol=1e-5)
    generated, _, _ = load_for_generation(str(base), str(second), "cpu", "fp32", None, merge_adapter=False)
    assert torch.equal(_logits(generated), trained)
    without_stack = load_model(base, device="cpu")
    load_single(without_stack, second)
    assert not torch.allclose(_logits(without_stack.eval()), trained, atol=1e-3)  # the stack matters here


def lora_state_dict_of(model: nn.Module) -> dict[str, torch.Tensor]:
    from qlora_kit.lora import lora_state_dict

    return lora_state_dict(model)


def test_a_stack_that_does_not_fit_or_is_gone_is_named(base, tmp_path):
    other = save_tiny_checkpoint(tmp_path / "other", hidden_size=64, intermediate_size=96)
    foreign = _save_random_adapter(other, tmp_path / "foreign", seed=1)
    model = load_model(base, device="cpu")
    with pytest.raises(QloraKitError, match=r"base adapter .*foreign does not fit this model: model\.layers\.0"):
        adapters.stack_adapters(model, [foreign])
    first = _save_random_adapter(base, tmp_path / "first", seed=1)
    second = _save_random_adapter(base, tmp_path / "second", seed=2)
    adapter_json = second / "qlora_kit.json"
    adapter_json.write_text(json.dumps({"kind": "adapter", "base_adapters": [str(tmp_path / "gone")]}))
    with pytest.raises(QloraKitError, match=r"trained on top of .*gone .*which does not exist any more"):
        adapters.read_stack([second])
    adapter_json.write_text(json.dumps({"kind": "adapter", "base_adapters": str(first)}))
    with pytest.raises(QloraKitError, match="base_adapters should be a list of adapter dirs"):
        adapters.read_stack([second])


def test_training_over_base_adapters_keeps_them_frozen_and_records_them(tiny_dir, tmp_path):
    from qlora_kit.config import load_config
    from qlora_kit.generate import load_for_generation
    from qlora_kit.train import finish, fit, prepare, setup
    from tests.test_train import TOOLS, _overrides

    first = _save_random_adapter(tiny_dir, tmp_path / "first", seed=1, targets="attention")
    extra = {"lora.base_adapters": f"[{first}]", "train.max_steps": 2, "train.save_steps": 1, "lora.dropout": 0.0}
    cfg = load_config(TOOLS.parent / "smollm2_alpaca.yaml", _overrides(tiny_dir, tmp_path / "run", **extra))
    run = setup(prepare(cfg))
    stacked = {name: m for name, m in run.model.named_modules() if isinstance(m, adapters.StackedNF4Linear)}
    assert len(stacked) == 2 * 4  # q/k/v/o of both layers
    frozen = {name: [t.clone() for t in m.buffers()] for name, m in stacked.items()}
    assert not any("stacked" in name for name, _ in run.model.named_parameters())
    finish(run, fit(run))
    for name, module in stacked.items():  # the frozen adapter (and the 4-bit base) did not move
        assert all(torch.equal(a, b) for a, b in zip(frozen[name], module.buffers(), strict=True))
    record = [str(first.resolve())]
    assert json.loads((tmp_path / "run" / "adapter" / "qlora_kit.json").read_text())["base_adapters"] == record
    checkpoint = tmp_path / "run" / "checkpoints" / "step-000002"
    assert json.loads((checkpoint / "qlora_kit.json").read_text())["base_adapters"] == record
    generated, _, _ = load_for_generation(str(tiny_dir), str(tmp_path / "run"), "cpu", "fp32", None, False)
    assert torch.equal(_logits(generated), _logits(run.model.eval()))

    # resume from the stacked checkpoint continues the same run (same model, one more step)
    more = load_config(TOOLS.parent / "smollm2_alpaca.yaml", _overrides(tiny_dir, tmp_path / "run", **extra))
    more.train.max_steps = 3
    resumed = setup(prepare(more))
    assert resumed.step == 2 and torch.equal(_logits(resumed.model.eval()), _logits(run.model))


def test_the_plan_counts_extra_and_stacked_adapters_as_their_own_bytes(base, two):
    from qlora_kit.memory import plan_memory
    from qlora_kit.memory.budget import base_adapter_params
    from qlora_kit.memory.shapes import checkpoint_shape

    a, b = two
    model = load_model(base, device="cpu")
    adapters.load_adapter(model, a, name="a")
    adapters.load_adapter(model, b, name="b")
    shape = checkpoint_shape(str(base))
    knobs = dict(rank=8, targets=["q_proj", "v_proj"], device="cpu")
    plan = plan_memory(shape, **knobs, extra_adapters=2)
    rows = {row.item: row.bytes for row in plan.rows}
    assert rows["extra adapters"] == 2 * adapters.adapter_bytes(model, "b") == 2 * rows["LoRA parameters"]
    frozen = base_adapter_params([str(a), str(b)])
    assert frozen == sum(t.numel() for path in (a, b) for t in load_file_tensors(path))
    stacked = plan_memory(shape, **knobs, base_adapter_params=frozen)
    held = {row.item: row.bytes for row in stacked.rows}["frozen base adapters"]
    assert held == adapters.adapter_bytes(model, "a") + adapters.adapter_bytes(model, "b")
    assert stacked.phases["load"] == plan_memory(shape, **knobs).phases["load"] + held


def test_a_stacked_adapter_is_not_loaded_beside_others(base, tmp_path):
    from qlora_kit.generate import load_for_generation

    first = _save_random_adapter(base, tmp_path / "first", seed=1)
    model = load_model(base, device="cpu")
    adapters.stack_adapters(model, [first])
    add_lora(model, "attention", r=2)
    second = save_adapter(model, tmp_path / "second", str(base), adapters.stack_record([first]))
    with pytest.raises(QloraKitError, match=r"adapter 's' .* was trained on top of other adapters .* load it alone"):
        load_for_generation(str(base), [f"f={first}", f"s={second}"], "cpu", "fp32", None, False)


def test_an_adapter_with_embeddings_is_not_stacked(base, tmp_path):
    from qlora_kit.embeddings import add_trainable_embeddings

    model = load_model(base, device="cpu")
    add_lora(model, "attention", r=2)
    add_trainable_embeddings(model, [5])
    with_tokens = save_adapter(model, tmp_path / "tokens", str(base))
    fresh = load_model(base, device="cpu")
    plain = _save_random_adapter(base, tmp_path / "plain", seed=1)
    with pytest.raises(QloraKitError, match="cannot be stacked under a new adapter: it trains embeddings"):
        adapters.stack_adapters(fresh, [plain, with_tokens])  # the first one is not stacked either
    assert not any(isinstance(m, adapters.StackedNF4Linear) for m in fresh.modules())
