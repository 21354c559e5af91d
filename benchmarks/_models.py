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
    # Fields added later: part of the recipe only where they differ from these defaults,
    # so that the families cached before them stay valid.
    num_kv_heads: int | None = None  # grouped-query attention (None: as many as num_heads)
    tie_word_embeddings: bool = False
    # Built tensor by tensor into one shard per layer (no model object, no whole model
    # in memory): the 3B and 70B-slice families, which a float32 LlamaForCausalLM
    # would not fit in this machine's memory beside its bf16 copy.
    sharded: bool = False


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
# Llama-3-70B's shapes (hidden 8192, vocabulary 128256, 64 heads / 8 kv heads, MLP
# 28672) with one decoder layer: 2.9B parameters, ~5.8 GB bf16 per model. What a 70B
# merge's largest tensors cost, on a machine that cannot hold a 70B model.
SLICE_70B = FamilySpec(
    vocab_size=128256,
    hidden_size=8192,
    intermediate_size=28672,
    num_layers=1,
    num_heads=64,
    num_kv_heads=8,
    sharded=True,
)
# Llama-3.2-3B's shapes, all 28 layers, tied embeddings (3.2B parameters).
THREE_B = FamilySpec(
    vocab_size=128256,
    hidden_size=3072,
    intermediate_size=8192,
    num_layers=28,
    num_heads=24,
    num_kv_heads=8,
    tie_word_embeddings=True,
    sharded=True,
)
FAMILIES = {"quick": QUICK, "full": FULL, "1b": ONE_B, "3b": THREE_B, "70b-slice": SLICE_70B}


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
        help="Models: quick (smoke run), full (166M), 1b (0.95B; drawn on a GPU if any), "
        "3b (Llama-3.2-3B's shapes, 3.2B), 70b-slice (Llama-3-70B's shapes, 1 layer, 2.9B).",
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
        num_key_value_heads=spec.num_kv_heads or spec.num_heads,
        max_position_embeddings=512,
        tie_word_embeddings=spec.tie_word_embeddings,
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
    defaults = FamilySpec(1, 1, 1, 1, 1)
    recipe = {k: v for k, v in asdict(spec).items() if k not in _LATER or v != getattr(defaults, k)}
    if spec.sharded:
        device = "cpu"  # drawn tensor by tensor on the CPU: one recipe whatever the machine
    recipe |= {"device": torch.device(device).type} if device != "cpu" else {}
    wanted = json.dumps(recipe, sort_keys=True)
    weights = _INDEX if spec.sharded else "model.safetensors"
    if (
        stamp.exists()
        and stamp.read_text() == wanted
        and all((p / weights).exists() for p in paths)
    ):
        return paths[0], paths[1:]
    if spec.sharded:
        stamp.unlink(missing_ok=True)
        _build_sharded(spec, paths)
        stamp.write_text(wanted)
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


def _shapes(spec: FamilySpec) -> list[list[tuple[str, tuple[int, ...]]]]:
    """The checkpoint's tensors (Llama names and shapes), grouped one shard each: the
    embedding, every decoder layer, then the final norm and the LM head."""
    h, i, v = spec.hidden_size, spec.intermediate_size, spec.vocab_size
    kv = (spec.num_kv_heads or spec.num_heads) * (h // spec.num_heads)
    shards = [[("model.embed_tokens.weight", (v, h))]]
    for n in range(spec.num_layers):
        p = f"model.layers.{n}."
        shards.append(
            [
                (p + "self_attn.q_proj.weight", (h, h)),
                (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, h)),
                (p + "mlp.gate_proj.weight", (i, h)),
                (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i)),
                (p + "input_layernorm.weight", (h,)),
                (p + "post_attention_layernorm.weight", (h,)),
            ]
        )
    last = [("model.norm.weight", (h,))]
    if not spec.tie_word_embeddings:
        last.append(("lm_head.weight", (v, h)))
    shards.append(last)
    return shards


_LATER = ("num_kv_heads", "tie_word_embeddings", "sharded")
_INDEX = "model.safetensors.index.json"
_ROWS = 2048  # rows drawn at a time: float32 temporaries stay ~100 MB at hidden 8192


def _draw_base(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """As LlamaForCausalLM initializes it: norms 1, every matrix N(0, 0.02), in bf16."""
    if len(shape) == 1:
        return torch.ones(shape, dtype=torch.bfloat16)
    out = torch.empty(shape, dtype=torch.bfloat16)
    for start in range(0, shape[0], _ROWS):
        rows = out[start : start + _ROWS]
        rows.copy_(torch.randn(rows.shape, generator=generator).mul_(0.02))
    return out


def _std(rows: torch.Tensor) -> float:
    """The sample standard deviation, in float64 a block of rows at a time."""
    total = square = 0.0
    for start in range(0, rows.shape[0], _ROWS):
        x = rows[start : start + _ROWS].double()
        total += float(x.sum())
        square += float(x.square().sum())
    n = rows.numel()
    return max(0.0, (square - total * total / n) / (n - 1)) ** 0.5


def _draw_expert(spec: FamilySpec, base: torch.Tensor, generator: torch.Generator):
    """base + dense noise + sparse edits (build_family's recipe), a block of rows at a time."""
    out = torch.empty_like(base)
    flat_base, flat_out = base.reshape(base.shape[0], -1), out.reshape(base.shape[0], -1)
    std = _std(flat_base) if base.numel() > 1 else 1.0
    for start in range(0, flat_base.shape[0], _ROWS):
        x = flat_base[start : start + _ROWS].float()
        delta = torch.randn(x.shape, generator=generator).mul_(spec.dense_scale * std)
        sparse = torch.rand(x.shape, generator=generator) < spec.sparse_density
        delta += (
            torch.randn(x.shape, generator=generator).mul_(sparse).mul_(spec.sparse_scale * std)
        )
        flat_out[start : start + _ROWS] = x.add_(delta)
    return out


def _build_sharded(spec: FamilySpec, paths: list[Path]) -> None:
    """Base and experts written shard by shard: at most one shard of each in memory."""
    from safetensors.torch import save_file

    config = _llama_config(spec)
    groups = _shapes(spec)
    files = [f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors" for k in range(len(groups))]
    for path in paths:
        path.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(path)
        (path / _INDEX).unlink(missing_ok=True)
    generators = [torch.Generator().manual_seed(spec.seed + k) for k in range(len(paths))]
    weight_map, total = {}, 0
    for group, file in zip(groups, files, strict=True):
        base = {name: _draw_base(name, shape, generators[0]) for name, shape in group}
        save_file(base, str(paths[0] / file), metadata={"format": "pt"})
        for path, generator in zip(paths[1:], generators[1:], strict=True):
            expert = {name: _draw_expert(spec, t, generator) for name, t in base.items()}
            save_file(expert, str(path / file), metadata={"format": "pt"})
            del expert
        for name, tensor in base.items():
            weight_map[name] = file
            total += tensor.numel() * tensor.element_size()
        del base
    index = json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
    for path in paths:  # written last: its presence says the model is complete
        (path / _INDEX).write_text(index)


def parameter_count(spec: FamilySpec) -> int:
    h, i, v, n = spec.hidden_size, spec.intermediate_size, spec.vocab_size, spec.num_layers
    kv = (spec.num_kv_heads or spec.num_heads) * (h // spec.num_heads)
    per_layer = 2 * h * h + 2 * kv * h + 3 * h * i + 2 * h
    return (1 if spec.tie_word_embeddings else 2) * v * h + n * per_layer + h
