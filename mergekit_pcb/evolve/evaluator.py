"""A loaded model plus scorers: writes a candidate's weights in place and scores it.

The same class runs in the driver process and inside each Ray actor, so local
and distributed searches score candidates identically.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from mergekit_pcb.evolve.cache import TensorCache
from mergekit_pcb.evolve.candidate import ModelWriter
from mergekit_pcb.evolve.config import EvolveConfig, EvolveConfigError
from mergekit_pcb.evolve.layout import Values
from mergekit_pcb.evolve.tasks import checked, make_scorer

LOG = logging.getLogger("mergekit_pcb.evolve")


def load_tokenizer(cfg: EvolveConfig, *, warn: bool = True):
    """The tokenizer every task gets: the ``tokenizer:`` key's, else the base model's.

    Called by the search before anything is written or cached, so a tokenizer that a
    task needs and that does not load fails at once, with the key to fix, not after
    the cache. When only ``python`` tasks run and no ``tokenizer:`` key is given, they
    still get the base's tokenizer (their functions may use it), and ``None``, said
    once (``warn``), when the base has none, so such a base can still be searched.
    """
    from transformers import AutoTokenizer

    source = cfg.tokenizer or cfg.base_model
    needed = cfg.tokenizer is not None or any(t.needs_tokenizer for t in cfg.evaluation.tasks)
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
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
        users = [t.name for t in cfg.evaluation.tasks if t.needs_tokenizer]
        why = f"task(s) {', '.join(users)} tokenize text" if users else "the tokenizer key"
        raise EvolveConfigError(
            f"tokenizer: cannot load a tokenizer from '{source}' (needed by {why}): {cause}. "
            "Name a folder or hub id with tokenizer files in the 'tokenizer:' key; "
            "python tasks alone need none"
        ) from None


def load_model(cfg: EvolveConfig, tokenizer=None):
    from mergekit.common import dtype_from_name
    from transformers import AutoModelForCausalLM

    if tokenizer is None:  # the search already said when there is none
        tokenizer = load_tokenizer(cfg, warn=False)
    model = AutoModelForCausalLM.from_pretrained(
        cfg.base_model, dtype=dtype_from_name(cfg.dtype), trust_remote_code=cfg.trust_remote_code
    ).to(cfg.device)
    model.eval()
    return model, tokenizer


class Evaluator:
    def __init__(self, cfg: EvolveConfig, cache: TensorCache, root: Path | None = None):
        self.cfg = cfg
        self.model, self.tokenizer = load_model(cfg)
        self.writer = ModelWriter(self.model, cache, cfg.cache.gpu_memory_gb)
        self.root = root
        self._scorers: dict[tuple[str, str], object] = {}

    def _scorer(self, task, split: str):
        key = (task.name, split)
        if key not in self._scorers:
            self._scorers[key] = make_scorer(task, split, self.model, self.tokenizer, self.root)
        return self._scorers[key]

    @torch.no_grad()
    def evaluate(self, values: Values, split: str = "search") -> tuple[dict[str, float], float]:
        """Per-task raw scores of ``values`` on ``split`` and the seconds it took."""
        start = time.perf_counter()
        self.writer.write(values)
        scores = {}
        for task in self.cfg.evaluation.tasks:
            if split == "test" and not task.has_test:
                continue
            scores[task.name] = checked(task.name, self._scorer(task, split)(self.model))
        return scores, time.perf_counter() - start
