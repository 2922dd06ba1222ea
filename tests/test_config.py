"""Run config: YAML recipes, key=value overrides, type coercion, helpful errors, YAML/dict round trips."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from qlora_kit.config import (
    SECTIONS,
    DataConfig,
    LoRAConfig,
    RunConfig,
    TrainConfig,
    config_help,
    field_docs,
    from_dict,
    load_config,
    to_dict,
    to_yaml,
    validate,
)
from qlora_kit.errors import QloraKitError

# Other modules code against these names; renaming one is a breaking change.
CONTRACT_FIELDS = {
    "model": ["name_or_path", "compute_dtype", "device", "gradient_checkpointing", "max_memory_gb"],
    "lora": ["r", "alpha", "dropout", "targets", "use_rslora", "adapter_dtype"],
    "data": [
        "path", "format", "split", "val_path", "val_set_size", "column_map", "template", "cutoff_len",
        "train_on_inputs", "add_eos", "group_by_length", "packing", "max_samples", "shuffle_seed",
    ],
    "train": [
        "micro_batch_size", "gradient_accumulation_steps", "num_epochs", "max_steps", "learning_rate",
        "lr_scheduler", "warmup_ratio", "warmup_steps", "weight_decay", "adam_beta1", "adam_beta2",
        "max_grad_norm", "optimizer", "eval_steps", "save_steps", "save_total_limit", "logging_steps", "seed",
        "resume",
    ],
    "output": ["dir", "tensorboard", "sample_prompts", "sample_max_new_tokens"],
}  # fmt: skip


def write_recipe(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error_of(recipe: Path | None = None, overrides: list[str] | None = None) -> str:
    with pytest.raises(QloraKitError) as info:
        load_config(recipe, overrides or [])
    return str(info.value)


# --- the dataclasses and their docstrings --------------------------------------------------------------


def test_contract_field_names_are_all_present():
    assert list(SECTIONS) == list(CONTRACT_FIELDS)
    for section, names in CONTRACT_FIELDS.items():
        present = [f.name for f in dataclasses.fields(SECTIONS[section])]
        assert present[: len(names)] == names, section


def test_every_field_has_a_docstring():
    for section, cls in SECTIONS.items():
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            assert docs.get(f.name, "").strip(), f"{section}.{f.name} has no docstring"


def test_multiline_docstring_is_dedented():
    doc = field_docs(DataConfig)["val_set_size"]
    assert "\n" in doc
    assert all(not line.startswith(" ") for line in doc.splitlines())


def test_mutable_defaults_are_not_shared():
    first, second = RunConfig(), RunConfig()
    first.output.sample_prompts.append("hi")
    first.data.column_map["output"] = "response"
    assert second.output.sample_prompts == [] and second.data.column_map == {}


# --- loading: defaults, recipe, overrides --------------------------------------------------------------


def test_no_recipe_no_overrides_gives_defaults():
    assert load_config(None) == RunConfig()
    validate(RunConfig())  # the defaults are a valid run


def test_recipe_then_overrides_precedence(tmp_path):
    recipe = write_recipe(
        tmp_path,
        """
model:
  name_or_path: my/model
lora:
  r: 32
  alpha: 64
train:
  learning_rate: 1.0e-4
  max_steps: 10
""",
    )
    cfg = load_config(recipe, ["lora.r=8", "train.max_steps=20", "train.max_steps=30"])
    assert cfg.lora.r == 8  # override beats recipe
    assert cfg.lora.alpha == 64.0 and isinstance(cfg.lora.alpha, float)  # recipe beats default
    assert cfg.train.max_steps == 30  # the last override wins
    assert cfg.train.learning_rate == 1e-4
    assert cfg.model.name_or_path == "my/model"
    assert cfg.lora.dropout == LoRAConfig().dropout  # untouched keys keep their defaults


def test_empty_recipe_and_empty_section_give_defaults(tmp_path):
    assert load_config(write_recipe(tmp_path, "# nothing here\n")) == RunConfig()
    assert load_config(write_recipe(tmp_path, "lora:\ntrain:\n", "b.yaml")) == RunConfig()


def test_relative_paths_are_kept_as_written(tmp_path):
    recipe = write_recipe(tmp_path, "data:\n  path: data/train.jsonl\n  val_path: ../val.jsonl\n")
    cfg = load_config(recipe)
    assert (cfg.data.path, cfg.data.val_path) == ("data/train.jsonl", "../val.jsonl")


# --- type coercion -------------------------------------------------------------------------------------


def test_exponent_floats_from_yaml_and_overrides(tmp_path):
    # YAML 1.1 reads 2e-4 (no dot) as a string; a float field must still get a float.
    recipe = write_recipe(tmp_path, "train:\n  learning_rate: 2e-4\n")
    assert yaml.safe_load("x: 2e-4")["x"] == "2e-4"
    assert load_config(recipe).train.learning_rate == 2e-4
    cfg = load_config(None, ["train.learning_rate=3e-5", "lora.alpha=16", "train.num_epochs=2"])
    assert cfg.train.learning_rate == 3e-5
    assert cfg.lora.alpha == 16.0 and type(cfg.lora.alpha) is float
    assert cfg.train.num_epochs == 2.0 and type(cfg.train.num_epochs) is float


def test_int_fields_accept_whole_numbers_only():
    assert load_config(None, ["train.max_steps=1e3"]).train.max_steps == 1000
    assert load_config(None, ["data.cutoff_len=512.0"]).data.cutoff_len == 512
    message = error_of(overrides=["lora.r=8.5"])
    assert "'lora.r'" in message and "an integer" in message and "8.5" in message
    assert "an integer" in error_of(overrides=["lora.r=eight"])


def test_bool_fields_reject_numbers_and_numbers_reject_bools():
    assert load_config(None, ["data.packing=true", "model.gradient_checkpointing=false"]).data.packing is True
    assert "true or false" in error_of(overrides=["data.packing=1"])
    assert "an integer" in error_of(overrides=["lora.r=true"])


def test_string_fields_keep_the_text_as_typed(tmp_path):
    # YAML would turn these into an int, an octal, a bool and a mapping.
    cfg = load_config(None, ["output.dir=2024", "data.split=0123", "model.name_or_path=yes", "train.resume=ckpt: 1"])
    assert cfg.output.dir == "2024"
    assert cfg.data.split == "0123"
    assert cfg.model.name_or_path == "yes"
    assert cfg.train.resume == "ckpt: 1"
    # A YAML file's all-digit value becomes the string of that int; a bool is refused with the key named.
    assert load_config(write_recipe(tmp_path, "data:\n  split: 2024\n")).data.split == "2024"
    message = error_of(write_recipe(tmp_path, "train:\n  resume: no\n", "b.yaml"))
    assert "'train.resume'" in message and "b.yaml" in message and "a string" in message


def test_optional_fields_take_null_and_none():
    cfg = load_config(None, ["data.val_path=none", "data.max_samples=null", "model.max_memory_gb=None"])
    assert (cfg.data.val_path, cfg.data.max_samples, cfg.model.max_memory_gb) == (None, None, None)
    cfg = load_config(None, ["data.val_path=val.jsonl", "data.max_samples=50", "model.max_memory_gb=24"])
    assert (cfg.data.val_path, cfg.data.max_samples, cfg.model.max_memory_gb) == ("val.jsonl", 50, 24.0)
    assert "'train.seed'" in error_of(overrides=["train.seed=null"])  # not optional


def test_list_and_dict_overrides():
    cfg = load_config(
        None,
        [
            "lora.targets=[q_proj,v_proj]",
            "data.column_map={output: response, instruction: prompt}",
            "output.sample_prompts=['Translate: hello', plain prompt]",
        ],
    )
    assert cfg.lora.targets == ["q_proj", "v_proj"]
    assert cfg.data.column_map == {"output": "response", "instruction": "prompt"}
    assert cfg.output.sample_prompts == ["Translate: hello", "plain prompt"]
    assert load_config(None, ["lora.targets=attention"]).lora.targets == "attention"
    assert load_config(None, ["output.sample_prompts=[]"]).output.sample_prompts == []


def test_list_and_dict_type_errors_name_the_key():
    message = error_of(overrides=["data.column_map=[a, b]"])
    assert "'data.column_map'" in message and "a mapping" in message
    # An unquoted colon inside a flow list makes a mapping, not a string.
    message = error_of(overrides=["output.sample_prompts=[Translate: hello]"])
    assert "'output.sample_prompts'" in message and "a list of strings" in message
    assert "could not parse" in error_of(overrides=["lora.targets=[q_proj, v_proj"])


# --- unknown keys and malformed overrides --------------------------------------------------------------


def test_unknown_key_in_recipe_suggests_the_closest(tmp_path):
    recipe = write_recipe(tmp_path, "lora:\n  rank: 8\n", "x.yaml")
    assert error_of(recipe) == f"unknown key 'lora.rank' in {recipe}; did you mean 'lora.r'?"


@pytest.mark.parametrize(
    ("override", "suggestion"),
    [
        ("lora.dropuot=0.1", "lora.dropout"),  # typo
        ("train.learnig_rate=1e-4", "train.learning_rate"),  # typo
        ("lora.learning_rate=1e-4", "train.learning_rate"),  # right field, wrong section
        ("training.seed=1", "train.seed"),  # misspelled section
        ("lora.target_modules=[q_proj]", "lora.targets"),  # peft's name
        ("train.lr=1e-4", "train.learning_rate"),  # common abbreviation
    ],
)
def test_unknown_override_key_suggestions(override, suggestion):
    message = error_of(overrides=[override])
    assert f"unknown key '{override.split('=')[0]}'" in message
    assert f"override {override!r}" in message
    assert message.endswith(f"did you mean '{suggestion}'?")


def test_unknown_key_without_a_close_match_lists_the_valid_ones():
    message = error_of(overrides=["train.zzzz=1"])
    assert "valid keys in 'train'" in message and "learning_rate" in message and "did you mean" not in message
    message = error_of(overrides=["qqqq.zzzz=1"])
    assert "valid sections: model, lora, data, train, output" in message


def test_unknown_sections_and_top_level_fields_in_recipe(tmp_path):
    message = error_of(write_recipe(tmp_path, "lroa:\n  r: 8\n"))
    assert "unknown section 'lroa'" in message and "did you mean 'lora'?" in message
    message = error_of(write_recipe(tmp_path, "learning_rate: 1e-4\n", "b.yaml"))
    assert "unknown section 'learning_rate'" in message and "did you mean 'train.learning_rate'?" in message


@pytest.mark.parametrize("override", ["lora.r", "lora=8", "r=8", "data.column_map.output=response"])
def test_malformed_override_explains_the_form(override):
    message = error_of(overrides=[override])
    assert repr(override) in message and "section.field=value" in message and "lora.r=8" in message


def test_recipe_file_problems(tmp_path):
    assert "cannot read recipe" in error_of(tmp_path / "missing.yaml")
    assert "not valid YAML" in error_of(write_recipe(tmp_path, "lora: [r: 8\n", "bad.yaml"))
    assert "must be a mapping" in error_of(write_recipe(tmp_path, "- lora\n- train\n", "list.yaml"))
    message = error_of(write_recipe(tmp_path, "lora: 8\n", "flat.yaml"))
    assert "section 'lora'" in message and "flat.yaml" in message and "mapping" in message


# --- validation ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("lora.r=0", "lora.r = 0: must be > 0"),
        ("lora.alpha=-1", "lora.alpha = -1.0: must be > 0"),
        ("lora.dropout=1", "lora.dropout = 1.0: must be in [0, 1)"),
        ("lora.dropout=-0.1", "lora.dropout = -0.1"),
        ("train.learning_rate=0", "train.learning_rate = 0.0: must be > 0"),
        ("train.learning_rate=nan", "train.learning_rate = nan"),
        ("train.micro_batch_size=0", "train.micro_batch_size = 0: must be >= 1"),
        ("train.gradient_accumulation_steps=0", "train.gradient_accumulation_steps = 0"),
        ("train.num_epochs=0", "train.num_epochs = 0.0: must be > 0 unless train.max_steps > 0"),
        ("train.warmup_ratio=1", "train.warmup_ratio = 1.0: must be in [0, 1)"),
        ("train.warmup_steps=-1", "train.warmup_steps = -1"),
        ("train.max_grad_norm=-0.5", "train.max_grad_norm = -0.5"),
        ("train.save_total_limit=0", "train.save_total_limit = 0: must be >= 1"),
        ("data.cutoff_len=4", "data.cutoff_len = 4: must be >= 8"),
        ("data.val_set_size=-1", "data.val_set_size = -1.0"),
        ("data.val_set_size=1.5", "data.val_set_size = 1.5"),
        ("data.max_samples=0", "data.max_samples = 0"),
        ("model.max_memory_gb=0", "model.max_memory_gb = 0.0: must be a number of GiB > 0, or null"),
        ("model.max_memory_gb=-24", "model.max_memory_gb = -24.0: must be a number of GiB > 0, or null"),
        ("model.max_memory_gb=inf", "model.max_memory_gb = inf: must be a number of GiB > 0, or null"),
        ("model.max_memory_gb=nan", "model.max_memory_gb = nan: must be a number of GiB > 0, or null"),
        (
            "model.compute_dtype=float32",
            "model.compute_dtype = 'float32': allowed values: auto, bf16, fp16, fp32",
        ),
        ("lora.adapter_dtype=int8", "lora.adapter_dtype = 'int8': allowed values: auto, bf16, fp16, fp32"),
        ("model.device=gpu", "model.device = 'gpu': allowed values: auto, cpu, cuda, cuda:N"),
        ("train.optimizer=sgd", "train.optimizer = 'sgd': allowed values: auto, paged_adamw_32bit"),
        ("train.lr_scheduler=step", "train.lr_scheduler = 'step': allowed values: constant, cosine, linear"),
        ("data.format=sharegpt", "data.format = 'sharegpt': allowed values: alpaca, chat"),
        ("data.template=vicuna", "data.template = 'vicuna': allowed values: alpaca"),
        ("lora.targets=q_proj,v_proj", "lora.targets = 'q_proj,v_proj': a string must be a preset"),
        ("lora.targets=[]", "lora.targets = []"),
        ("output.dir=", "output.dir = '': must not be empty"),
        ("lora.variant=lokr", "lora.variant = 'lokr': allowed values: lora, dora, vera"),
        ("lora.init=olora", "lora.init = 'olora': allowed values: default, pissa, loftq"),
        ("lora.init_iters=0", "lora.init_iters = 0: must be >= 1"),
        ("lora.variant=dora lora.init=pissa", "lora.init = 'pissa': pissa initializes plain LoRA's A and B"),
        ("lora.variant=vera lora.use_rslora=true", "lora.use_rslora = True: does not apply to lora.variant=vera"),
        ("train.loraplus_lr_ratio=0.5", "train.loraplus_lr_ratio = 0.5: must be >= 1 or null"),
        ("train.fsdp_cpu_offload=true", "train.fsdp_cpu_offload = True: needs train.parallel=fsdp"),
        ("train.parallel=ddp train.fsdp_cpu_offload=true", "train.fsdp_cpu_offload = True: needs train.parallel=fsdp"),
    ],
)
def test_range_errors_name_key_value_and_rule(override, expected):
    message = error_of(overrides=override.split(" "))
    assert message.startswith("invalid config")
    assert expected in message


def test_valid_edge_values_pass():
    cfg = load_config(
        None,
        [
            "train.num_epochs=0",
            "train.max_steps=5",  # max_steps > 0 makes num_epochs irrelevant
            "lora.dropout=0",
            "train.max_grad_norm=0",
            "data.val_set_size=0.1",
            "data.cutoff_len=8",
            "model.device=cuda:1",
            "train.optimizer=paged_adamw_8bit",
        ],
    )
    assert cfg.train.max_steps == 5 and cfg.model.device == "cuda:1"
    assert load_config(None, ["data.val_set_size=200"]).data.val_set_size == 200.0


def test_val_path_and_val_set_size_conflict():
    message = error_of(overrides=["data.val_path=val.jsonl", "data.val_set_size=0.1"])
    assert "data.val_set_size = 0.1" in message and "data.val_path" in message


def test_every_problem_is_reported_at_once():
    message = error_of(overrides=["lora.r=0", "train.learning_rate=-1", "data.format=x"])
    assert all(key in message for key in ("lora.r = 0", "train.learning_rate = -1.0", "data.format = 'x'"))
    assert message.count("\n") == 3


def test_validate_checks_a_config_built_in_code():
    cfg = RunConfig(train=TrainConfig(micro_batch_size=0))
    with pytest.raises(QloraKitError, match=r"train\.micro_batch_size = 0"):
        validate(cfg)


# --- round trips ---------------------------------------------------------------------------------------


def unusual_config() -> RunConfig:
    """Values that are easy to lose in YAML: look-alike strings, newlines, unicode, tiny floats, None."""
    return load_config(
        None,
        [
            "model.name_or_path=0123",
            "model.max_memory_gb=23.5",
            "lora.targets=[q_proj, 'yes', gate_proj]",
            "lora.use_rslora=true",
            "data.path=data/my file: v2.jsonl",
            "data.column_map={output: response, 'null': '~'}",
            "data.max_samples=7",
            "train.learning_rate=1e-5",
            "train.max_steps=3",
            "train.resume=auto",
            "output.dir=null",  # a string field: the text "null", not None
            # YAML double quotes turn \n into a newline
            """output.sample_prompts=["Line one\\nline two", 'héllo — 世界', '# not a comment', "it's"]""",
        ],
    )


def test_unusual_values_survive_the_override_parser():
    cfg = unusual_config()
    assert cfg.model.name_or_path == "0123"
    assert cfg.lora.targets == ["q_proj", "yes", "gate_proj"]
    assert cfg.data.column_map == {"output": "response", "null": "~"}
    assert cfg.output.dir == "null"
    assert cfg.output.sample_prompts[0] == "Line one\nline two"


@pytest.mark.parametrize("make", [RunConfig, unusual_config])
def test_yaml_round_trip(tmp_path, make):
    cfg = make()
    text = to_yaml(cfg)
    path = write_recipe(tmp_path, text, "config.yaml")
    assert load_config(path) == cfg


def test_yaml_has_section_headers_and_docstring_comments():
    text = to_yaml(RunConfig())
    lines = text.splitlines()
    for section, cls in SECTIONS.items():
        assert f"{section}:" in lines
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            key_line = next(i for i, line in enumerate(lines) if line.startswith(f"  {f.name}:"))
            comment_lines = docs[f.name].splitlines()
            above = [line.removeprefix("  # ").strip() for line in lines[key_line - len(comment_lines) : key_line]]
            assert above == [line.strip() for line in comment_lines], f"{section}.{f.name}"


def test_dict_round_trip_is_plain_and_deep():
    cfg = unusual_config()
    data = to_dict(cfg)
    assert json.loads(json.dumps(data)) == data  # plain values only: storable in a checkpoint
    assert from_dict(data) == cfg
    data["lora"]["targets"].append("o_proj")
    assert cfg.lora.targets == ["q_proj", "yes", "gate_proj"]  # to_dict copied, not aliased


def test_from_dict_fills_defaults_and_checks_keys_and_types():
    cfg = from_dict({"lora": {"r": 4}})
    assert cfg.lora.r == 4 and cfg.train == TrainConfig()
    with pytest.raises(QloraKitError, match=r"unknown key 'lora.rank' in checkpoint; did you mean 'lora.r'"):
        from_dict({"lora": {"rank": 4}}, source="checkpoint")
    with pytest.raises(QloraKitError, match=r"'lora.r'.*an integer"):
        from_dict({"lora": {"r": "four"}})


# --- help ----------------------------------------------------------------------------------------------


def test_help_lists_every_key_with_type_default_and_docstring():
    text = config_help()
    flat = " ".join(text.split())
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f"  {section}.{f.name}  (" in text
            assert " ".join(field_docs(cls)[f.name].split()) in flat, f"{section}.{f.name}"
    assert "lora.r  (int, default: 16)" in text
    assert "data.val_path  (str | None, default: null)" in text
    assert "lora.targets  (list[str] | str, default: all-linear)" in text
    assert max(len(line) for line in text.splitlines()) <= 110


def test_cli_overrides_may_come_before_or_after_options(capsys):
    from qlora_kit.cli import main

    recipe = str(Path(__file__).parent.parent / "recipes" / "smollm2_alpaca.yaml")
    for argv in (
        ["train", recipe, "train.max_steps=3", "--print-config"],
        ["train", recipe, "--print-config", "train.max_steps=3", "lora.r=4"],
    ):
        assert main(argv) == 0
        printed = yaml.safe_load(capsys.readouterr().out)
        assert printed["train"]["max_steps"] == 3, argv
