"""The real ``mergekit-yaml`` with ``merge_method: pcb`` on tiny local Llama models.

Each test writes a config, runs the installed ``mergekit-yaml`` in a subprocess
and compares EVERY tensor it wrote with :func:`expected.expected_outputs`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import check, load_tensors, run_tool, write
from expected import AlignedCheckpoints, Checkpoints, compare_all, vocabulary

CARD_LINK = "[PCB](https://arxiv.org/abs/2410.02396)"


def merge(config: str, out: Path, *options) -> dict[str, torch.Tensor]:
    config_path = write(out.parent / f"{out.name}.yml", config)
    check(run_tool("mergekit-yaml", config_path, out, "--quiet", *options))
    return load_tensors(out)


def test_models_config_every_tensor_and_model_card(family, tmp_path):
    e0, e1, e2 = family.experts
    config = f"""merge_method: pcb
base_model: {family.base}
models:
  - model: {family.base}
  - model: {e0}
    parameters:
      weight: 0.7
  - model: {e1}
    parameters:
      weight: 1.3
  - model: {e2}
parameters:
  pcb_ratio: 0.2
  clamp_ratio: 1e-3
  lambda: 1.1
"""
    out = tmp_path / "out"
    written = merge(config, out)
    assert yaml.safe_load(config)["parameters"]["clamp_ratio"] == "1e-3"  # a string in YAML
    compare_all(config, written, Checkpoints())
    assert set(written) == set(load_tensors(family.base))
    card = (out / "README.md").read_text()
    assert CARD_LINK in card and "pcb_ratio" in card
    assert (out / "mergekit_config.yml").read_text() == config
    assert (out / "config.json").exists()


def test_slices_layer_ranges_gradients_and_filters(family, tmp_path):
    """Two slices (3 layers, then 1 repeated), per-layer lists, filters, slice overrides."""
    e0, e1, e2 = family.experts
    base = family.base
    config = f"""merge_method: pcb
base_model: {base}
slices:
  - sources:
      - model: {base}
        layer_range: [0, 3]
      - model: {e0}
        layer_range: [0, 3]
        parameters:
          weight: [0.5, 1.5]
      - model: {e1}
        layer_range: [0, 3]
        parameters:
          weight:
            - filter: mlp
              value: [2.0, 1.0, 0.0]
            - value: 0.9
  - sources:
      - model: {base}
        layer_range: [1, 2]
      - model: {e0}
        layer_range: [1, 2]
      - model: {e2}
        layer_range: [1, 2]
        parameters:
          weight: 0.6
    parameters:
      pcb_ratio: 0.4
parameters:
  pcb_ratio: [0.1, 0.3, 0.5]
  clamp_ratio:
    - filter: mlp
      value: 0.01
    - value: 0.001
  lambda:
    - filter: self_attn
      value: [0.8, 1.2]
    - value: 1.0
  weight: 1.1
dtype: float32
"""
    out = tmp_path / "out"
    written = merge(config, out)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 4
    compare_all(config, written, Checkpoints())


def test_gradient_values_hand_computed():
    """The test's own gradient rule, checked by hand: t = layer / (layers - 1)."""
    from expected import evaluate, interpolate

    assert interpolate([0.1, 0.3, 0.5], 0.0) == 0.1
    assert interpolate([0.1, 0.3, 0.5], 0.5) == 0.3
    assert abs(interpolate([0.1, 0.3, 0.5], 0.75) - 0.4) < 1e-12
    assert interpolate([0.5, 1.5], 1.0) == 1.5
    filtered = [{"filter": "mlp", "value": [2.0, 0.0]}, {"value": 0.9}]
    assert evaluate(filtered, "model.layers.1.mlp.up_proj.weight", 0.25) == 1.5
    assert evaluate(filtered, "model.layers.1.self_attn.q_proj.weight", 0.25) == 0.9


def test_dtype_and_out_dtype(family, tmp_path):
    e0, e1, _ = family.experts
    config = f"""merge_method: pcb
base_model: {family.base}
models:
  - model: {e0}
  - model: {e1}
parameters:
  pcb_ratio: 0.3
dtype: bfloat16
out_dtype: float16
"""
    written = merge(config, tmp_path / "out")
    # Inputs are rounded to bfloat16 first (the reference sees those values), the
    # result is rounded to bfloat16 by the method and then cast to float16.
    compare_all(config, written, Checkpoints(), out_dtype=torch.float16, rounding=2**-8)


@pytest.mark.parametrize("source", ["base", "union"])
def test_tokenizer_source_with_different_vocabularies(family, big_vocab, tmp_path, source):
    e0 = family.experts[0]
    config = f"""merge_method: pcb
base_model: {family.base}
models:
  - model: {e0}
  - model: {big_vocab}
parameters:
  pcb_ratio: 0.3
tokenizer_source: {source}
dtype: float32
"""
    out = tmp_path / "out"
    written = merge(config, out)
    out_vocab = vocabulary(out)
    base_vocab, big = vocabulary(family.base), vocabulary(big_vocab)
    assert set(out_vocab) == (set(base_vocab) if source == "base" else set(big))
    hidden = written["model.norm.weight"].shape[0]
    assert written["model.embed_tokens.weight"].shape == (len(out_vocab), hidden)
    assert written["lm_head.weight"].shape == (len(out_vocab), hidden)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == len(out_vocab)
    compare_all(config, written, AlignedCheckpoints(out_vocab, [family.base, e0, big_vocab]))


def test_lazy_unpickle_bin_inputs_and_several_shards(bin_family, tmp_path):
    e0, e1, e2 = bin_family.experts
    config = f"""merge_method: pcb
base_model: {bin_family.base}
models:
  - model: {e0}
  - model: {e1}
    parameters:
      weight: 0.5
  - model: {e2}
parameters:
  pcb_ratio: 0.15
"""
    out = tmp_path / "out"
    written = merge(
        config, out, "--lazy-unpickle", "--out-shard-size", "20K", "--no-safe-serialization"
    )
    shards = sorted(p.name for p in out.glob("*.bin"))
    assert len(shards) >= 3, shards
    index = json.loads((out / "pytorch_model.bin.index.json").read_text())
    assert set(index["weight_map"]) == set(written)
    compare_all(config, written, Checkpoints())


@pytest.mark.gpu
@pytest.mark.parametrize("options", [("--cuda",), ("--device", "cuda", "--read-to-gpu")])
def test_cuda_and_device_options(family, tmp_path, options):
    e0, e1, e2 = family.experts
    config = f"""merge_method: pcb
base_model: {family.base}
models:
  - model: {e0}
  - model: {e1}
    parameters:
      weight: 0.8
  - model: {e2}
parameters:
  pcb_ratio: 0.2
  clamp_ratio: 0.01
"""
    written = merge(config, tmp_path / "out", *options)
    compare_all(config, written, Checkpoints())
