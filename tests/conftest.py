"""Shared fixtures: tiny local Llama families built once per session, and CLI helpers.

Every end-to-end test runs the real ``mergekit-yaml`` (or ``mergekit-pcb``) in a
subprocess, the way a user does, so registration through the installed ``.pth``
hook is exercised on every run; models are written once per session because
building them costs more than merging them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(1, str(Path(__file__).parent.parent / "benchmarks"))  # toy.py

BIN = Path(sys.executable).parent
NUM_LAYERS = 3
TINY = {"hidden_size": 32, "num_layers": NUM_LAYERS, "num_heads": 2}


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@dataclass(frozen=True)
class Family:
    """A base and fine-tuned experts on disk (absolute paths, so mergekit never asks the Hub)."""

    root: Path
    base: Path
    experts: tuple[Path, ...]

    @property
    def models(self) -> tuple[Path, ...]:
        return (self.base, *self.experts)


def build(root: Path, **kwargs) -> Family:
    from mergekit_pcb.tiny import build_family

    base, experts = build_family(root, **{**TINY, **kwargs})
    return Family(root.resolve(), base.resolve(), tuple(p.resolve() for p in experts))


@pytest.fixture(scope="session")
def family(tmp_path_factory) -> Family:
    """Base + 3 experts, float32, 3 layers, vocabulary of the default alphabet."""
    return build(tmp_path_factory.mktemp("family"), n_experts=3, seed=0)


@pytest.fixture(scope="session")
def big_vocab(tmp_path_factory, family) -> Path:
    """An expert of ``family`` whose tokenizer adds tokens: larger embeddings, same base."""
    from transformers import LlamaForCausalLM

    from mergekit_pcb.tiny import DEFAULT_ALPHABET, char_tokenizer, make_experts, save_model

    tokenizer = char_tokenizer(DEFAULT_ALPHABET + "ABCDEFG")
    base = LlamaForCausalLM.from_pretrained(family.base)
    (expert,) = make_experts(base, 1, seed=77)
    old = expert.get_input_embeddings().weight.shape[0]
    expert.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(5)
        for matrix in (expert.get_input_embeddings().weight, expert.get_output_embeddings().weight):
            matrix[old:] = 0.02 * torch.randn(matrix[old:].shape, generator=generator)
    return save_model(expert, tmp_path_factory.mktemp("bigvocab") / "m", tokenizer).resolve()


@pytest.fixture(scope="session")
def bin_family(tmp_path_factory, family) -> Family:
    """``family`` re-saved as pickled ``pytorch_model.bin`` checkpoints (no safetensors)."""
    root = tmp_path_factory.mktemp("binfamily")
    paths = []
    for path in family.models:
        target = root / path.name
        shutil.copytree(path, target, ignore=shutil.ignore_patterns("*.safetensors*"))
        torch.save(load_tensors(path), target / "pytorch_model.bin")
        paths.append(target.resolve())
    return Family(root.resolve(), paths[0], tuple(paths[1:]))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory, safetensors or pickle, any number of shards."""
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(Path(path).glob("*.safetensors")):
        tensors.update(load_file(shard))
    for shard in sorted(Path(path).glob("*.bin")):
        tensors.update(torch.load(shard, map_location="cpu", weights_only=True))
    return tensors


def run_tool(
    tool: str, *args, env: dict | None = None, cwd: Path | None = None, timeout: int = 300
) -> subprocess.CompletedProcess:
    """Run an installed console script of this venv, as a user would."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    full_env.pop("MERGEKIT_PCB_NO_AUTOLOAD", None)
    full_env.update(env or {})
    return subprocess.run(
        [str(BIN / tool), *map(str, args)],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd,
        timeout=timeout,
    )


def run_python(code: str, env: dict | None = None, timeout: int = 300):
    full_env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    full_env.pop("MERGEKIT_PCB_NO_AUTOLOAD", None)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
    )


def check(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def last_error_line(stderr: str) -> str:
    """The final message line, ignoring tqdm progress bars that mergekit draws after errors."""
    lines = []
    for line in stderr.splitlines():
        line = line.split("Writing model shards")[0].split("\r")[0].strip()
        if line:
            lines.append(line)
    return lines[-1] if lines else ""


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def assert_close_to_reference(actual: torch.Tensor, expected: torch.Tensor, name: str = "") -> None:
    """Equal up to the rounding of the output dtype (the reference is float64)."""
    expected = expected.to(torch.float64)
    actual = actual.to(torch.float64)
    assert actual.shape == expected.shape, name
    eps = torch.finfo(torch.float32).eps
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(
        actual,
        expected,
        rtol=8 * eps,
        atol=8 * eps * max(scale, 1e-30),
        msg=lambda m: f"{name}: {m}",
    )
