"""Tiny local Llama models and a character tokenizer, built without any download.

The demo, the tests, the search's tests and the quality benchmark all need real
checkpoints that mergekit can read; these helpers make them in milliseconds.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch

DEFAULT_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz+-*=<>|:;,. ?"
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]


def char_tokenizer(alphabet: str = DEFAULT_ALPHABET):
    """A character-level fast tokenizer: one token per character, ids stable by alphabet."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in dict.fromkeys(alphabet):
        vocab.setdefault(ch, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )


def tiny_llama_config(
    vocab_size: int,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 128,
):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def new_llama(config, seed: int = 0, dtype: torch.dtype = torch.float32):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(dtype)


def save_model(model, path: os.PathLike, tokenizer=None, *, safe: bool = True) -> Path:
    path = Path(path)
    model.save_pretrained(path, safe_serialization=safe)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


def make_experts(
    base,
    n: int,
    *,
    scale: float = 0.02,
    density: float = 0.3,
    seed: int = 1,
) -> list:
    """Copies of ``base`` with sparse random task vectors (a stand-in for fine-tuning).

    Each expert changes a random ``density`` share of every floating tensor by
    Gaussian noise of standard deviation ``scale`` times that tensor's own.
    """
    import copy

    generator = torch.Generator().manual_seed(seed)
    experts = []
    for _ in range(n):
        expert = copy.deepcopy(base)
        with torch.no_grad():
            for param in expert.parameters():
                noise = torch.randn(param.shape, generator=generator)
                keep = torch.rand(param.shape, generator=generator) < density
                std = float(param.float().std()) if param.numel() > 1 else 1.0
                param.add_((noise * keep * scale * std).to(param.dtype))
        experts.append(expert)
    return experts


def build_family(
    root: os.PathLike,
    *,
    n_experts: int = 3,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    alphabet: str = DEFAULT_ALPHABET,
    names: Iterable[str] | None = None,
    **config_kwargs,
) -> tuple[Path, list[Path]]:
    """Write a base and ``n_experts`` experts (with a shared tokenizer) under ``root``."""
    root = Path(root)
    tokenizer = char_tokenizer(alphabet)
    config = tiny_llama_config(len(tokenizer), **config_kwargs)
    base = new_llama(config, seed=seed, dtype=dtype)
    names = list(names or (f"expert{i}" for i in range(n_experts)))
    base_path = save_model(base, root / "base", tokenizer)
    paths = [
        save_model(expert, root / name, tokenizer)
        for name, expert in zip(names, make_experts(base, len(names), seed=seed + 1), strict=True)
    ]
    return base_path, paths
