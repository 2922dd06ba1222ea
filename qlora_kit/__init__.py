"""qlora-kit: QLoRA fine-tuning on one GPU (NF4 base model, our own LoRA, planned and measured memory)."""

__version__ = "0.1.0"
