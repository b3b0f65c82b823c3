from setuptools import find_packages, setup

setup(
    name="headmap-peft",
    version="0.1.0",
    description="HeadMap (ICLR 2025): locate a task's knowledge circuit and fine-tune along it, as a PEFT method",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["headmap_peft", "headmap_peft.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "transformers>=5.0",
        "peft>=0.21",
        "accelerate>=1.0",
        "datasets>=3.0",
        "safetensors",
        "tqdm",
    ],
    extras_require={
        "bnb": ["bitsandbytes>=0.45"],
        "plot": ["matplotlib"],
        "trl": ["trl>=0.20"],
        "tests": ["pytest", "bitsandbytes>=0.45", "matplotlib", "trl>=0.20", "ruff"],
    },
    entry_points={"console_scripts": ["headmap=headmap_peft.cli:main"]},
)
