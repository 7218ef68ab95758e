from setuptools import find_packages, setup

setup(
    name="keel",
    version="0.1.0",
    description="Distributed training for large models: one sharded backbone, Megatron-style parallelism, RL post-training",
    python_requires=">=3.10",
    packages=find_packages(include=["keel", "keel.*"]),
    # Non-Python files keel reads at run time: sbatch templates, the KSA remote-code model.
    package_data={"keel.cli": ["templates/*.sbatch.j2"], "keel.model.ksa_remote": ["*.py"]},
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
        "sympy",  # math answer verification in keel.rl.rewards
        "matplotlib",  # keel plot
        "pillow",  # keel kelix: PNG images in and out
        "faiss-cpu",  # k-means of the semantic-ID tokenizer (keel sid build)
    ],
    extras_require={
        "gpu": ["transformer-engine[pytorch]", "flash-attn", "torchao"],
        "rl": ["vllm", "reasoning-gym==0.1.25"],
        "dev": ["pytest", "pytest-xdist", "filelock", "import-linter", "accelerate", "deepspeed", "torchao", "triton", "reasoning-gym==0.1.25"],
    },
    entry_points={
        "console_scripts": ["keel=keel.cli:main"],
        # vLLM calls this in every process it starts: registers KSAForCausalLM (untested: no vLLM here).
        "vllm.general_plugins": ["keel_ksa = keel.model.ksa_remote.vllm_plugin:register"],
    },
)
