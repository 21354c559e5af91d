"""Step 4 of the search: a loaded model plus scorers; writes a candidate's weights in
place and scores it on a split, or on a fidelity slice of the search split.

The same class runs in the driver process and inside each Ray actor, so local
and distributed searches score candidates identically. It is given the parts of
the config it uses (the merge's inputs and the tasks), which also travel to Ray.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import torch

from mergekit_pcb.evolve.cache import TensorCache
from mergekit_pcb.evolve.candidate import ModelWriter
from mergekit_pcb.evolve.config import EvolveConfigError, MergeInputs, TaskSpec
from mergekit_pcb.evolve.layout import Values
from mergekit_pcb.evolve.tasks import checked, make_scorer

LOG = logging.getLogger("mergekit_pcb.evolve")


def load_tokenizer(inputs: MergeInputs, tasks: Sequence[TaskSpec], *, warn: bool = True):
    """The tokenizer every task gets: the ``tokenizer:`` key's, else the base model's.

    Called by the search before anything is written or cached, so a tokenizer that a
    task needs and that does not load fails at once, with the key to fix, not after
    the cache. When only ``python`` tasks run and no ``tokenizer:`` key is given, they
    still get the base's tokenizer (their functions may use it), and ``None``, said
    once (``warn``), when the base has none, so such a base can still be searched.
    """
    from transformers import AutoTokenizer

    source = inputs.tokenizer or inputs.base_model
    needed = inputs.tokenizer is not None or any(t.needs_tokenizer for t in tasks)
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=inputs.trust_remote_code)
    except Exception as exc:  # missing files, sentencepiece, ...: the user's to fix
        cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if not needed:
            if warn:
                LOG.warning(
                    "no tokenizer loads from base_model '%s' (%s): python task functions get "
                    "tokenizer=None; name one with the 'tokenizer:' key if they need it",
                    source,
                    cause,
                )
            return None
        users = [t.name for t in tasks if t.needs_tokenizer]
        why = f"task(s) {', '.join(users)} tokenize text" if users else "the tokenizer key"
        raise EvolveConfigError(
            f"tokenizer: cannot load a tokenizer from '{source}' (needed by {why}): {cause}. "
            "Name a folder or hub id with tokenizer files in the 'tokenizer:' key; "
            "python tasks alone need none"
        ) from None


def load_model(inputs: MergeInputs, tokenizer=None, tasks: Sequence[TaskSpec] = ()):
    from mergekit.common import dtype_from_name
    from transformers import AutoModelForCausalLM

    if tokenizer is None:  # the search already said when there is none
        tokenizer = load_tokenizer(inputs, tasks, warn=False)
    model = AutoModelForCausalLM.from_pretrained(
        inputs.base_model,
        dtype=dtype_from_name(inputs.dtype),
        trust_remote_code=inputs.trust_remote_code,
    ).to(inputs.device)
    model.eval()
    return model, tokenizer


class Result(NamedTuple):
    """One candidate scored on one split or slice."""

    scores: dict[str, float]  # raw score per task
    examples: int | None  # examples scored, all tasks (None: a task does not say)
    seconds: float  # scoring
    merge_seconds: float  # writing the candidate's weights into the model


class Evaluator:
    def __init__(
        self,
        inputs: MergeInputs,
        tasks: Sequence[TaskSpec],
        cache: TensorCache,
        root: Path | None = None,
        gpu_memory_gb: float | None = None,
        outputs: Mapping[str, Sequence[str]] | None = None,
    ):
        self.tasks = tuple(tasks)
        self.outputs = outputs  # agreement tasks' cached expert outputs (.agreement)
        self.model, self.tokenizer = load_model(inputs, tasks=self.tasks)
        self.writer = ModelWriter(self.model, cache, gpu_memory_gb)
        self.root = root
        self._scorers: dict[tuple[str, str, int | None], object] = {}

    def _scorer(self, task, split: str, limit: int | None):
        key = (task.name, split, limit)
        if key not in self._scorers:
            self._scorers[key] = make_scorer(
                task, split, self.model, self.tokenizer, self.root, limit, self.outputs
            )
        return self._scorers[key]

    @torch.no_grad()
    def evaluate(
        self, values: Values, split: str = "search", limits: Mapping[str, int] | None = None
    ) -> Result:
        """Per-task raw scores of ``values`` on ``split`` (on the search split: each task's
        first ``limits[task]`` examples where given), the examples and the seconds."""
        start = time.perf_counter()
        self.writer.write(values)
        merged = time.perf_counter()
        scores, examples = {}, 0
        for task in self.tasks:
            if split == "test" and not task.has_test:
                continue
            limit = limits.get(task.name) if limits and split == "search" else None
            scored = self._scorer(task, split, limit)(self.model)
            scores[task.name] = checked(task.name, scored.score)
            examples = (
                None
                if examples is None or scored.examples is None
                else (examples + scored.examples)
            )
        return Result(scores, examples, time.perf_counter() - merged, merged - start)
