from setuptools import find_packages, setup

setup(
    name="keel",
    version="0.1.0",
    description="Distributed training for large models: one sharded backbone, Megatron-style parallelism, RL post-training",
    python_requires=">=3.10",
    packages=find_packages(include=["keel", "keel.*"]),
    install_requires=[
        # A range torch 2.13 satisfies, so CPU machines keep their CPU wheel and GPU clusters their CUDA build.
        "torch>=2.6",
        "numpy",
        "pyyaml",
        "tqdm",
        "safetensors",
        "transformers>=4.51",
        "tokenizers",
        "megatron-core>=0.12",
        "wandb",
        "gguf",
    ],
    extras_require={
        "gpu": ["transformer-engine[pytorch]", "flash-attn", "torchao"],
        "rl": ["vllm"],
        "dev": ["pytest", "accelerate", "deepspeed", "torchao", "triton"],
    },
    entry_points={"console_scripts": ["keel=keel.cli:main"]},
)
