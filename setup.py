from setuptools import find_packages, setup

setup(
    name="lmscale",
    version="0.1.0",
    description="Train and fine-tune transformer language models on DeepSpeed, from a laptop CPU to a SLURM cluster.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["lmscale", "lmscale.*"]),
    # The recipes, DeepSpeed JSONs, sbatch template and launcher script ship inside the package
    # (lmscale/resources links to the repository's top-level folders), so a wheel install has them.
    package_data={
        "lmscale": [
            "resources/configs/*.yaml",
            "resources/ds_configs/*.json",
            "resources/slurm/*.template",
            "resources/launcher/*.py",
        ]
    },
    install_requires=[
        # Users on clusters bring their own CUDA torch; any 2.x from 2.4 on works.
        "torch>=2.4,<3",
        "deepspeed>=0.15",
        "transformers>=4.46",
        "datasets>=3.0",
        "tokenizers>=0.20",
        "accelerate>=1.0",
        "wandb>=0.18",
        "pydantic>=2.11",
        "PyYAML>=6.0",
        "tqdm>=4.66",
        "rich>=13",
        "matplotlib>=3.7",
        "filelock>=3.12",
        "fsspec>=2023.1",  # checkpoint.mirror and data paths as URLs (the protocols' packages are extras)
        "datasketch>=1.6",
        "psutil>=5.9",
        "pytorch-optimizer>=3.0",  # Lion, and LAMB off GPU
        "sacrebleu>=2.3",
        "rouge-score>=0.1.2",
        "optuna>=4.0",  # sweeps: TPE, grid, random, median pruning
        "peft>=0.13",  # LoRA adapters
    ],
    extras_require={
        "tensorboard": ["tensorboard>=2.14"],
        "eval": ["lm-eval>=0.4.8"],  # lmscale eval --harness, eval.harness_tasks
        # checkpoint.mirror on object storage (fsspec's own implementations of each protocol)
        "s3": ["s3fs>=2024.6"],
        "gcs": ["gcsfs>=2024.6"],
        "azure": ["adlfs>=2024.4"],
        "cloud": ["s3fs>=2024.6", "gcsfs>=2024.6", "adlfs>=2024.4"],
        "test": [
            "pytest>=8",
            "pytest-timeout>=2.3",
            "hypothesis>=6.100",
            "ruff>=0.6",
            "tensorboard>=2.14",
            "lm-eval>=0.4.8",
            "trl>=1.16,<2",  # the DPO parity test's oracle (it calls DPOTrainer._compute_loss of TRL 1.x)
            "s3fs>=2024.6",
            "moto[server]>=5.0",  # the S3-compatible server the mirror tests start on the loopback
        ],
    },
    entry_points={"console_scripts": ["lmscale=lmscale.cli:main"]},
)
