"""Benchmark checkpoints: a random bf16 Llama base and experts, built once and cached.

The benchmark must never download anything, and building ~1.3 GB of weights costs
about a minute, so the family is written under a cache directory (outside git)
and reused while its recipe (the ``SPEC`` below) is unchanged.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

CACHE_ENV = "MERGEKIT_PCB_BENCH_CACHE"


@dataclass(frozen=True)
class FamilySpec:
    """Everything that determines the cached weights; a change invalidates the cache."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    n_experts: int = 3
    seed: int = 0
    # Experts = base + dense small noise (fine-tuning drift) + sparse larger edits.
    dense_scale: float = 0.002
    sparse_scale: float = 0.02
    sparse_density: float = 0.05
    version: int = 2


FULL = FamilySpec(
    vocab_size=32000, hidden_size=768, intermediate_size=3200, num_layers=12, num_heads=12
)
QUICK = FamilySpec(
    vocab_size=2000, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4
)
# The shape of a TinyLlama-1.1B (0.95B parameters untied): what GPU and many-core
# merges are timed on.
ONE_B = FamilySpec(
    vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=16, num_heads=16
)
FAMILIES = {"quick": QUICK, "full": FULL, "1b": ONE_B}


def family_options(command):
    """``--family``, its ``--quick`` shorthand and ``--cache-dir``, as every benchmark
    takes them."""
    import click

    command = click.option(
        "--cache-dir",
        type=click.Path(path_type=Path),
        default=None,
        help=f"Where the models are built (default ${CACHE_ENV} or ~/.cache/mergekit-pcb-bench).",
    )(command)
    command = click.option("--quick", is_flag=True, help="Same as --family quick.")(command)
    return click.option(
        "--family",
        type=click.Choice(list(FAMILIES)),
        default="full",
        show_default=True,
        help="Models: quick (smoke run), full (166M), 1b (0.95B; drawn on a GPU if any).",
    )(command)


def family_spec(family: str, quick: bool) -> FamilySpec:
    return FAMILIES["quick" if quick else family]


def cache_root() -> Path:
    default = Path.home() / ".cache" / "mergekit-pcb-bench"
    return Path(os.environ.get(CACHE_ENV, default))


def _llama_config(spec: FamilySpec):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        torch_dtype="bfloat16",
        architectures=["LlamaForCausalLM"],
    )


def _write(path: Path, config, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(path)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def build_family(
    spec: FamilySpec, root: Path | None = None, device: str = "cpu"
) -> tuple[Path, list[Path]]:
    """Return (base, experts) directories, building them only if the cache is stale.

    ``device``: where the random weights are drawn; a GPU draws 4 x 1B in seconds where
    one CPU thread takes minutes. Its random stream differs from the CPU's, so the
    device is part of the recipe: the same statistics, not the same bits.
    """
    root = (root or cache_root()) / f"llama-{spec.hidden_size}x{spec.num_layers}"
    names = ["base"] + [f"expert{i}" for i in range(spec.n_experts)]
    paths = [root / name for name in names]
    stamp = root / "spec.json"
    recipe = asdict(spec) | ({"device": torch.device(device).type} if device != "cpu" else {})
    wanted = json.dumps(recipe, sort_keys=True)
    if (
        stamp.exists()
        and stamp.read_text() == wanted
        and all((p / "model.safetensors").exists() for p in paths)
    ):
        return paths[0], paths[1:]

    from transformers import LlamaForCausalLM

    stamp.unlink(missing_ok=True)
    config = _llama_config(spec)
    torch.manual_seed(spec.seed)
    with torch.no_grad(), torch.device(device):
        model = LlamaForCausalLM(config)
        base = {
            k: v.detach().to("cpu", torch.bfloat16).contiguous()
            for k, v in model.state_dict().items()
        }
    del model
    _write(paths[0], config, base)
    generator = torch.Generator(device).manual_seed(spec.seed + 1)
    for path in paths[1:]:
        expert = {}
        for name, value in base.items():
            x = value.to(device, torch.float32)
            std = float(x.std()) if x.numel() > 1 else 1.0
            draw = {"generator": generator, "device": device}
            delta = torch.randn(x.shape, **draw).mul_(spec.dense_scale * std)
            sparse = torch.rand(x.shape, **draw) < spec.sparse_density
            delta += torch.randn(x.shape, **draw).mul_(sparse).mul_(spec.sparse_scale * std)
            expert[name] = x.add_(delta).to("cpu", torch.bfloat16)
            del delta, sparse
        _write(path, config, expert)
        del expert
    stamp.write_text(wanted)
    return paths[0], paths[1:]


def parameter_count(spec: FamilySpec) -> int:
    h, i, v, n = spec.hidden_size, spec.intermediate_size, spec.vocab_size, spec.num_layers
    per_layer = 4 * h * h + 3 * h * i + 2 * h
    return 2 * v * h + n * per_layer + h
