"""The run config: typed dataclasses, YAML recipes, ``section.field=value`` overrides and validation.

A run is ``RunConfig(model, lora, data, train, output)``. A recipe is a YAML file with those five sections;
overrides from the command line are applied on top (``lora.r=8``, ``lora.targets=[q_proj,v_proj]``).
Every field carries an attribute docstring (the string literal right after it): it is the CLI help text and
the comment written above the key by ``to_yaml``, so the documentation cannot drift from the code.

Every value is checked against its field's type hint where it enters (recipe file or override), so an
error names the key and where it came from; ``validate`` then checks ranges and allowed values.
"""

from qlora_kit.config.parse import from_dict, load_config, to_dict
from qlora_kit.config.render import config_help, field_docs, to_yaml
from qlora_kit.config.schema import (
    SECTIONS,
    DataConfig,
    LoRAConfig,
    ModelConfig,
    OutputConfig,
    RunConfig,
    TrainConfig,
)
from qlora_kit.config.validate import validate

__all__ = [
    "SECTIONS",
    "DataConfig",
    "LoRAConfig",
    "ModelConfig",
    "OutputConfig",
    "RunConfig",
    "TrainConfig",
    "config_help",
    "field_docs",
    "from_dict",
    "load_config",
    "to_dict",
    "to_yaml",
    "validate",
]
