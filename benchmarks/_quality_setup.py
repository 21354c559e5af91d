"""The benchmark's regime (model, tasks, training) and the cached checkpoints it trains.

Training is the slow part and is a pure function of the regime's training fields and
the seed, so base and experts are cached under a key derived from exactly those
fields; changing an evaluation setting (grid, split sizes) reuses them.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import torch
import toy
from safetensors.torch import load_file, save_file

from mergekit_pcb.tiny import new_llama, tiny_llama_config

CACHE_ENV = "MERGEKIT_PCB_BENCH_CACHE"
# Bump when the training code changes in a way the regime's fields do not capture.
TRAINING_VERSION = 2
VAL_SEED, TEST_SEED = 10_001, 20_002
REPLAY_SOURCES = ("kl", "base", "data")


@dataclass(frozen=True)
class Regime:
    """Everything that decides the numbers; RESULTS.md prints it verbatim."""

    name: str
    tasks: tuple[str, ...]
    hidden_size: int
    num_layers: int
    num_heads: int
    # Base: a short multi-task run, so it is decent but clearly below the experts.
    base_steps: int
    base_lr: float
    # Experts: a short, gentle polish of the base on one task each.
    expert_steps: int
    expert_lr: float
    expert_trainable: str | None
    # Share of each expert's training batches that replay the other tasks' prompts:
    # "kl": distilled from the base (KL to its next-token distributions along its own
    # greedy answers; Learning without Forgetting), so the expert keeps the base's
    # behaviour there, right or wrong, without learning those tasks; "base": the base's
    # greedy answers as hard labels (this also sharpens the base's behaviour there);
    # "data": the true answers (the expert then also improves the other tasks).
    expert_replay: float = 0.0
    replay_source: str = "base"
    # > 0: experts are LoRA adapters of this rank on every attention and MLP projection
    # (peft), merged into the dense weights before mergekit sees them; 0: full fine-tuning.
    expert_lora_rank: int = 0
    batch_size: int = 64
    train_per_task: int = 4000
    # Evaluation (not part of the cache key).
    seeds: tuple[int, ...] = (0, 1, 2)
    n_val: int = 300
    n_test: int = 1000
    # Every tuner (grid or search) re-ranks its `rescore_top` best-on-validation
    # candidates on `n_rescore` validation examples a task (the n_val ones and more of
    # the same stream): the pick among many candidates on n_val is partly luck. 0: off.
    rescore_top: int = 0
    n_rescore: int = 0
    scales: tuple[float, ...] = (0.15, 0.25, 0.35, 0.5, 0.7, 1.0, 1.4)
    densities: tuple[float, ...] = (0.1, 0.2, 0.4, 0.7)
    bootstrap: int = 2000
    training_fields: tuple[str, ...] = field(
        default=(
            "tasks",
            "hidden_size",
            "num_layers",
            "num_heads",
            "base_steps",
            "base_lr",
            "expert_steps",
            "expert_lr",
            "expert_trainable",
            "expert_replay",
            "replay_source",
            "expert_lora_rank",
            "batch_size",
            "train_per_task",
        ),
        repr=False,
    )

    def cache_key(self) -> str:
        fields = {name: getattr(self, name) for name in self.training_fields}
        fields["version"] = TRAINING_VERSION
        # The task generators and the training loop live in toy.py: any edit retrains.
        fields["toy"] = hashlib.sha256(Path(toy.__file__).read_bytes()).hexdigest()
        blob = json.dumps(fields, sort_keys=True, default=list).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def describe(self) -> dict:
        out = asdict(self)
        out.pop("training_fields")
        return out


FULL = Regime(
    name="distilled",
    tasks=toy.DEFAULT_TASKS,
    hidden_size=128,
    num_layers=2,
    num_heads=4,
    base_steps=300,
    base_lr=3e-3,
    expert_steps=200,
    expert_lr=2e-4,
    expert_trainable=None,
    expert_replay=0.5,
    replay_source="kl",
    seeds=(0, 1, 2, 3, 4),
    # 6 x 4 = 24 grid points (the size of the grid the search was measured
    # against); 100 validation and 500 test examples a task keep 3 regimes x 5 seeds,
    # with two 4x searches each, within reach of a 2-core machine.
    n_val=100,
    n_test=500,
    # The best-on-validation of 96 candidates overrates itself on 100 examples a task
    # (issue 17): every tuner re-ranks its 3 best on 500 (the 100 and 400 more).
    rescore_top=3,
    n_rescore=500,
    scales=(0.25, 0.5, 0.7, 1.0, 1.4, 2.0),
)
# Full fine-tuning with half of every batch replaying the base's training mixture (the
# other tasks, true answers): the usual recipe against forgetting, no distillation.
REPLAY = replace(FULL, name="replay", expert_replay=0.5, replay_source="data")
# LoRA experts (rank 8, attention and MLP projections) with the same replay, merged into
# the dense weights: what most community fine-tunes are by the time they are merged. At
# lr 1e-3 the experts gained too little for merging to work (Task Arithmetic kept 41% of
# their gain, seed 0): lr 3e-3 trains them as far as the full fine-tunes.
LORA = replace(REPLAY, name="lora", expert_lora_rank=8, expert_lr=3e-3)
REGIMES = {r.name: r for r in (FULL, REPLAY, LORA)}
# The same recipe on 3 tasks, 1 seed, shorter experts and a smaller grid.
QUICK = replace(
    FULL,
    name="quick",
    tasks=("reverse", "sort", "rotate"),
    expert_steps=100,
    seeds=(0,),
    n_val=150,
    n_test=500,
    n_rescore=300,
    scales=(0.25, 0.5, 1.0, 2.0),
    densities=(0.1, 0.4),
    bootstrap=500,
)
QUICK_REGIMES = {
    "distilled": QUICK,
    "replay": replace(QUICK, name="quick-replay", replay_source="data"),
    "lora": replace(
        QUICK, name="quick-lora", replay_source="data", expert_lora_rank=8, expert_lr=1e-3
    ),
}


def cache_root() -> Path:
    default = Path.home() / ".cache" / "mergekit-pcb-bench"
    return Path(os.environ.get(CACHE_ENV, default)) / "quality"


def model_config(regime: Regime, tokenizer):
    longest = max(
        len(ex.prompt) + len(ex.answer) + 2
        for task in toy.TASKS
        for ex in toy.make_examples(task, 200, 0)
    )
    return tiny_llama_config(
        len(tokenizer),
        hidden_size=regime.hidden_size,
        num_layers=regime.num_layers,
        num_heads=regime.num_heads,
        max_position_embeddings=longest + 8,
    )


def splits(regime: Regime) -> tuple[list[toy.Example], list[toy.Example]]:
    """Validation and test sets: fixed seeds far from any training seed."""
    val = [ex for task in regime.tasks for ex in toy.make_examples(task, regime.n_val, VAL_SEED)]
    test = [ex for task in regime.tasks for ex in toy.make_examples(task, regime.n_test, TEST_SEED)]
    return val, test


@dataclass
class Family:
    """A base and, per seed, one expert per task (all in memory, float32)."""

    tokenizer: object
    base: torch.nn.Module
    experts: dict[int, dict[str, dict[str, torch.Tensor]]]  # seed -> task -> state dict
    train_seconds: float
    cache_dir: Path


def _cached(path: Path, build) -> tuple[dict[str, torch.Tensor], float]:
    """Load or train; the seconds returned are 0 on a cache hit (see recorded_seconds)."""
    if path.exists():
        return load_file(path), 0.0
    start = time.perf_counter()
    state = build()
    seconds = time.perf_counter() - start
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in state.items()}, tmp)
    tmp.replace(path)
    # Kept so a run from the cache can still report what the training cost.
    path.with_suffix(".seconds").write_text(f"{seconds:.1f}\n")
    return state, seconds


def recorded_seconds(root: Path) -> float | None:
    """Training seconds recorded when the cached checkpoints were made (None if unknown)."""
    files = list(root.glob("*.safetensors"))
    sidecars = [f.with_suffix(".seconds") for f in files]
    if not files or not all(s.exists() for s in sidecars):
        return None
    return sum(float(s.read_text()) for s in sidecars)


def replay_pool(regime: Regime, base, tokenizer, seed: int) -> dict[str, list[toy.Example]]:
    """Per task, the prompts an expert of another task replays, answered per ``replay_source``.

    Sized so that, mixed into an expert's examples ("base", "data"), ``expert_replay``
    of them are replay, split equally over the other tasks; with "kl" that share of
    every batch is drawn from the pool instead. The prompts' seed is distinct from every
    training, validation and test seed.
    """
    if not 0.0 <= regime.expert_replay < 1.0:
        raise ValueError(f"expert_replay must be in [0, 1), got {regime.expert_replay}")
    if regime.replay_source not in REPLAY_SOURCES:
        raise ValueError(
            f"replay_source must be one of {REPLAY_SOURCES}, got {regime.replay_source!r}"
        )
    if regime.expert_replay == 0.0:
        return {task: [] for task in regime.tasks}
    total = round(regime.train_per_task * regime.expert_replay / (1.0 - regime.expert_replay))
    per_task = max(1, total // (len(regime.tasks) - 1))
    pool = {task: toy.make_examples(task, per_task, 500 + seed) for task in regime.tasks}
    if regime.replay_source in ("base", "kl"):
        pool = {task: toy.greedy_answers(base, tokenizer, exs) for task, exs in pool.items()}
    return pool


def build_family(regime: Regime, *, log=print) -> Family:
    tokenizer = toy.toy_tokenizer()
    config = model_config(regime, tokenizer)
    root = cache_root() / regime.cache_key()
    root.mkdir(parents=True, exist_ok=True)
    (root / "regime.json").write_text(json.dumps(regime.describe(), indent=1, default=list))
    spent = 0.0

    def train_base():
        model = new_llama(config, seed=0)
        data = toy.make_mixture(regime.tasks, regime.train_per_task, seed=0)
        toy.train(
            model,
            tokenizer,
            data,
            steps=regime.base_steps,
            lr=regime.base_lr,
            batch_size=regime.batch_size,
            seed=0,
            warmup=50,
        )
        return model.state_dict()

    state, seconds = _cached(root / "base.safetensors", train_base)
    spent += seconds
    log(f"base: trained in {seconds:.0f}s" if seconds else "base: from cache")
    base = new_llama(config, seed=0)
    base.load_state_dict(state)
    base.eval()

    experts: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
    pools: dict[int, dict[str, list[toy.Example]]] = {}

    def replay(task: str, seed: int) -> list[toy.Example]:
        if seed not in pools:  # made only when some expert of this seed is not cached
            pools[seed] = replay_pool(regime, base, tokenizer, seed)
        return [ex for other in regime.tasks if other != task for ex in pools[seed][other]]

    for seed in regime.seeds:
        experts[seed] = {}
        for index, task in enumerate(regime.tasks):

            def train_expert(task=task, seed=seed, index=index):
                model = copy.deepcopy(base)
                data = toy.make_examples(task, regime.train_per_task, 1000 * (seed + 1) + index)
                distill = {}
                if regime.replay_source == "kl" and regime.expert_replay > 0:
                    distill = dict(
                        distill=replay(task, seed), teacher=base, distill_share=regime.expert_replay
                    )
                else:
                    data += replay(task, seed)
                common = dict(
                    **distill,
                    steps=regime.expert_steps,
                    lr=regime.expert_lr,
                    batch_size=regime.batch_size,
                    seed=seed,
                    warmup=10,
                )
                if regime.expert_lora_rank:
                    toy.train_lora(model, tokenizer, data, rank=regime.expert_lora_rank, **common)
                else:
                    toy.train(model, tokenizer, data, trainable=regime.expert_trainable, **common)
                return {k: v.detach().clone() for k, v in model.state_dict().items()}

            state, seconds = _cached(root / f"expert-{task}-seed{seed}.safetensors", train_expert)
            spent += seconds
            experts[seed][task] = state
        log(f"experts seed {seed}: ready")
    return Family(tokenizer, base, experts, spent, root)


def rescore_split(regime: Regime) -> list[toy.Example]:
    """The validation examples the finalists are re-ranked on; the first n_val a task are
    the validation split itself (make_examples is a prefix-stable stream)."""
    if regime.rescore_top and regime.n_rescore <= regime.n_val:
        raise ValueError(f"{regime.name}: n_rescore must exceed n_val when rescore_top > 0")
    n = regime.n_rescore if regime.rescore_top else 0
    return [ex for task in regime.tasks for ex in toy.make_examples(task, n, VAL_SEED)]


class Bench(NamedTuple):
    """What every evaluation of a regime starts from."""

    family: Family
    model: torch.nn.Module  # a scratch model of the regime's shape: states are scored in it
    val: list[toy.Example]
    test: list[toy.Example]


def bench(regime: Regime, *, log=print) -> Bench:
    """The regime's family (trained or cached), a scratch model and its two splits."""
    family = build_family(regime, log=log)
    val, test = splits(regime)
    model = new_llama(model_config(regime, family.tokenizer), seed=0)
    return Bench(family, model, val, test)
