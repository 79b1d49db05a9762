"""cic-gpt2: GPT-2 fine-tuning for CICIoT2023 network-traffic classification on DeepSpeed."""

__version__ = "0.1.0"
