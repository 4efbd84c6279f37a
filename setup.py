from setuptools import find_packages, setup

setup(
    name="icot",
    version="0.1.0",
    description="Implicit chain-of-thought reasoning via knowledge distillation, on DeepSpeed",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["icot", "icot.*"]),
    package_data={"icot": ["recipes/*.yaml"]},
    install_requires=[
        # GPU users install the torch build for their platform first; this range accepts it.
        "torch>=2.1",
        "deepspeed>=0.14",
        "transformers>=4.45",
        "peft>=0.15",   # CODI's LoRA adapters
        "datasets>=2.19",
        "tokenizers>=0.19",
        "sentencepiece>=0.2",
        "safetensors>=0.4",
        "tensorboard>=2.14",
        "fire>=0.6",
        "pyyaml>=6.0",
        "tqdm>=4.66",
        "matplotlib>=3.7",
        "numpy>=1.24",
    ],
    extras_require={"dev": ["pytest>=7.4", "pytest-timeout>=2.2"]},
    entry_points={"console_scripts": ["icot=icot.cli:main"]},
)
