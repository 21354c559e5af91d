"""Step 1 of the search: its configuration (``SEARCH.yml``), validated completely
before any model loads.

A search runs for minutes to hours; a typo found after the cache is built wastes
all of that. So every check that needs no weights happens here: unknown keys
(with a did-you-mean), ranges and their domains, data files and each JSONL line,
and the import of ``python`` task targets.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mergekit_pcb.config_errors import (
    ConfigError,
    did_you_mean,
    format_validation_error,
    load_yaml,
)
from mergekit_pcb.evolve.data import DataError, read_jsonl
from mergekit_pcb.parameters import CLAMP_RATIO, LAMBDA, PCB_RATIO, WEIGHT


class EvolveConfigError(ConfigError):
    """A configuration problem, worded for the person who wrote the YAML."""


class _Strict(BaseModel):
    """Rejects unknown keys with a did-you-mean, which pydantic's own message lacks."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            known = sorted(field.alias or name for name, field in cls.model_fields.items())
            for key in data:
                if key not in known and key not in cls.model_fields:
                    raise ValueError(
                        f"unknown key '{key}'{did_you_mean(str(key), known)} "
                        f"(allowed: {', '.join(known)})"
                    )
        return data


# Checked by _range (not by type) so the error names the parameter and its domain.
RangeOrFixed = Any
SEARCHED = {p.name: p for p in (PCB_RATIO, LAMBDA, WEIGHT)}


def _range(name: str, value: Any) -> tuple[float, float]:
    """(low, high); a fixed number gives low == high (the value is not searched)."""
    parameter = SEARCHED[name]
    if isinstance(value, bool):
        raise ValueError(
            f"search.{name}: got {value!r}; allowed: {parameter.number_domain} or [low, high]"
        )
    if isinstance(value, (int, float)):
        low = high = float(value)
    elif (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    ):
        low, high = float(value[0]), float(value[1])
    else:
        raise ValueError(
            f"search.{name}: got {value!r}; allowed: one number ({parameter.number_domain}) "
            "or a range [low, high]"
        )
    for end, x in (("low", low), ("high", high)):
        if not parameter.contains(x):
            raise ValueError(f"search.{name}: {end} end {x!r} is outside {parameter.number_domain}")
    if low > high:
        raise ValueError(f"search.{name}: range [{low}, {high}] has low > high")
    return low, high


AUTO = "auto"  # lambda: auto (issue 22): pcb chooses the scale per tensor itself


def auto_lambda_available() -> bool:
    """Whether this version's pcb takes ``lambda: auto`` (the seam for issue 22: the search
    passes ``auto`` to mergekit's config and to the kernel exactly as pcb reads it)."""
    try:
        return LAMBDA.check(AUTO) == AUTO
    except ValueError:
        return False


def _check_auto(key: str) -> None:
    if not auto_lambda_available():
        raise ValueError(
            f"{key}: auto needs pcb's own lambda: auto (issue 22), which this version of "
            "mergekit-pcb does not have yet; allowed here: a number or [low, high]"
        )


class SearchSpace(_Strict):
    pcb_ratio: RangeOrFixed = Field(default_factory=lambda: [0.02, 0.5])
    # A range, a fixed number, or auto (fixed: pcb's own per-tensor scale, not searched).
    lambda_: RangeOrFixed = Field(default_factory=lambda: [0.5, 2.0], alias="lambda")
    weight: RangeOrFixed = Field(default_factory=lambda: [0.8, 1.3])
    layer_groups: int = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _ranges(self) -> SearchSpace:
        if self.lambda_auto:
            _check_auto("search.lambda")
        for name in ("pcb_ratio", "lambda", "weight"):
            if not (name == "lambda" and self.lambda_auto):
                self.range(name)
        return self

    @property
    def lambda_auto(self) -> bool:
        return self.lambda_ == AUTO

    def range(self, name: str) -> tuple[float, float]:
        """(low, high) of a searched quantity; low == high when it is fixed (for
        ``lambda: auto`` see :attr:`lambda_auto`: it has no numeric range)."""
        if name == "lambda" and self.lambda_auto:
            raise ValueError("search.lambda is auto: fixed, without a numeric range")
        value = self.lambda_ if name == "lambda" else getattr(self, name)
        return _range(name, value)

    def fixed(self, name: str) -> bool:
        return (name == "lambda" and self.lambda_auto) or len(set(self.range(name))) == 1


class FixedParameters(_Strict):
    """PCB parameters that are not searched; ``clamp_ratio`` shapes the cached scores."""

    clamp_ratio: float = CLAMP_RATIO.default

    @field_validator("clamp_ratio", mode="before")
    @classmethod
    def _clamp_ratio(cls, value: Any) -> float:
        return CLAMP_RATIO.check(value)


TaskType = Literal["loss", "exact_match", "choice", "lm_eval", "python", "agreement"]
NEEDS_DATA = ("loss", "exact_match", "choice")
# Keys of the label-free agreement task (:mod:`.agreement`) and nothing else.
AGREEMENT_KEYS = ("prompts", "top_k", "cache_max_gb", "cache_dtype")
# Normalisation floors: a default score of 0 accuracy must not blow up the scale.
DEFAULT_SCALE_FLOOR = {
    "loss": 1e-6,
    "exact_match": 0.05,
    "choice": 0.05,
    "lm_eval": 0.05,
    "python": 1e-6,
    "agreement": 1e-6,  # a mean KL in nats per token, like a loss
}


class TaskSpec(_Strict):
    name: str
    type: TaskType
    data: str | None = None
    test_data: str | None = None
    weight: float = Field(default=1.0, gt=0)
    batch_size: int = Field(default=32, ge=1)
    limit: int | None = Field(default=None, ge=1)
    # exact_match: the generation's length; agreement: each expert's continuation (0: none)
    max_new_tokens: int | None = Field(default=None, ge=0)
    function: str | None = None
    test_function: str | None = None
    kwargs: dict[str, Any] = Field(default_factory=dict)
    test_kwargs: dict[str, Any] | None = None
    # The larger split that optimizer.rescore re-ranks the best candidates on.
    rescore_data: str | None = None
    rescore_kwargs: dict[str, Any] | None = None
    # python: how many examples the function scores (its search split); needed to
    # count a budget in examples and for optimizer.fidelity (the function then takes
    # limit=n and scores its first n).
    examples: int | None = Field(default=None, ge=1)
    lm_eval_tasks: list[str] | None = None
    include_path: str | None = None
    metric: str | None = None
    higher_is_better: bool | None = None
    scale_floor: float | None = Field(default=None, gt=0)
    # agreement (label-free, :mod:`.agreement`): {model as in models: prompts JSONL}, the
    # expert's top-k kept per token, the bound on the cached outputs, their value dtype.
    # None: unset (the defaults live in .agreement; unset keys keep old fingerprints).
    prompts: dict[str, str] | None = None
    top_k: int | None = Field(default=None, ge=1)
    cache_max_gb: float | None = Field(default=None, gt=0)
    cache_dtype: Literal["float32", "float16"] | None = None

    @model_validator(mode="after")
    def _fields_for_type(self) -> TaskSpec:
        t = self.type
        if t == "agreement":
            self._agreement_fields()
        elif self.max_new_tokens == 0:
            raise ValueError(
                f"task '{self.name}': max_new_tokens: 0 is only for type agreement (no "
                "continuation); allowed here: >= 1"
            )
        elif any(getattr(self, key) is not None for key in AGREEMENT_KEYS):
            given = next(key for key in AGREEMENT_KEYS if getattr(self, key) is not None)
            raise ValueError(f"task '{self.name}': '{given}' is only for type agreement")
        if t in NEEDS_DATA and not self.data:
            raise ValueError(f"task '{self.name}' of type {t} needs 'data' (a JSONL file)")
        if t == "python" and not self.function:
            raise ValueError(f"task '{self.name}' of type python needs 'function: module:name'")
        if t != "python" and (self.function or self.test_function):
            raise ValueError(f"task '{self.name}': 'function' is only for type python")
        if t != "python" and (
            self.kwargs or self.test_kwargs is not None or self.rescore_kwargs is not None
        ):
            raise ValueError(
                f"task '{self.name}': 'kwargs'/'test_kwargs'/'rescore_kwargs' are only for type "
                "python"
            )
        if t != "python" and self.examples is not None:
            raise ValueError(
                f"task '{self.name}': 'examples' is only for type python (the others count "
                "their rows, or lm_eval's limit)"
            )
        if t not in NEEDS_DATA and self.rescore_data:
            raise ValueError(
                f"task '{self.name}': 'rescore_data' is only for types {', '.join(NEEDS_DATA)}"
            )
        if t == "lm_eval" and not self.lm_eval_tasks:
            raise ValueError(f"task '{self.name}' of type lm_eval needs 'lm_eval_tasks: [names]'")
        if t != "lm_eval" and (self.lm_eval_tasks or self.include_path or self.metric):
            raise ValueError(
                f"task '{self.name}': lm_eval_tasks/include_path/metric are only for type lm_eval"
            )
        if t in ("loss", "exact_match", "choice") and self.higher_is_better is not None:
            raise ValueError(
                f"task '{self.name}': higher_is_better is fixed for type {t}; "
                "only python and lm_eval tasks take it"
            )
        return self

    def _agreement_fields(self) -> None:
        """What an agreement task takes: prompts per expert instead of data and labels."""
        if not self.prompts:
            raise ValueError(
                f"task '{self.name}' of type agreement needs 'prompts: {{model: prompts.jsonl}}' "
                '(one JSONL of {"text": ...} lines for each model in models)'
            )
        for key in ("data", "test_data", "limit", "higher_is_better"):
            if getattr(self, key) is not None:
                raise ValueError(
                    f"task '{self.name}': '{key}' is not for type agreement (it reads "
                    "'prompts'; lower KL is better; every prompt is scored)"
                )

    @property
    def sign(self) -> float:
        """+1 where higher is better; loss scores (and agreement's KL) enter the objective
        flipped."""
        if self.type in ("loss", "agreement"):
            return -1.0
        return 1.0 if self.higher_is_better in (None, True) else -1.0

    @property
    def floor(self) -> float:
        return self.scale_floor if self.scale_floor is not None else DEFAULT_SCALE_FLOOR[self.type]

    def call_kwargs(self, split: str) -> dict[str, Any]:
        """Keyword arguments of a python task's function on ``split`` ('search', 'rescore'
        or 'test')."""
        if split == "test" and self.test_kwargs is not None:
            return dict(self.test_kwargs)
        if split == "rescore" and self.rescore_kwargs is not None:
            return dict(self.rescore_kwargs)
        return dict(self.kwargs)

    @property
    def rescore_split(self) -> str | None:
        """What optimizer.rescore scores this task on, in words; None: nothing beyond the
        search split (re-ranking on the same examples would change nothing)."""
        if self.type == "python":
            return "rescore_kwargs" if self.rescore_kwargs is not None else None
        if self.rescore_data:
            return "rescore_data"
        return "data without limit" if self.limit else None

    @property
    def needs_tokenizer(self) -> bool:
        """Whether the task fails without a tokenizer (python tasks get ``None`` then)."""
        return self.type != "python"

    @property
    def has_test(self) -> bool:
        if self.type == "python":
            return self.test_function is not None
        if self.type == "lm_eval":
            return False
        return self.test_data is not None


class Evaluation(_Strict):
    tasks: list[TaskSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> Evaluation:
        names = [t.name for t in self.tasks]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"task names must be unique; repeated: {', '.join(dupes)}")
        return self


class StartPoint(_Strict):
    """Where the optimizer starts instead of PCB's defaults; unnamed quantities keep the
    default. ``lambda: auto``: pcb's own per-tensor scale (issue 22) as the start."""

    pcb_ratio: float | None = None
    lambda_: float | Literal["auto"] | None = Field(default=None, alias="lambda")
    weight: float | list[float] | None = None

    @field_validator("lambda_")
    @classmethod
    def _auto(cls, value):
        if value == AUTO:
            _check_auto("optimizer.start.lambda")
        return value


class Fidelity(_Strict):
    """Successive halving (:mod:`.fidelity`): ``rungs`` slices of every task's search
    split, each ``eta`` times the one below, the last the whole split; a rung passes
    the best ``1/eta`` of what it scored to the next. ``rungs: 1``: off."""

    rungs: int = Field(default=1, ge=1, le=8)
    eta: int = Field(default=3, ge=2, le=10)


OptimizerMethod = Literal["cmaes", "tpe", "gp", "random"]


class Optimizer(_Strict):
    """The search's budget, optimizer and schedule.

    ``budget`` counts every scored candidate: the default, ``start``, the sweep and the
    optimizer's; ``budget_examples`` instead counts the examples they are scored on
    (every rung of :class:`Fidelity`). ``rescore`` scores again, on the rescore split,
    what the search already scored (its ``rescore`` best and the default, which sets
    the scale), on top of the budget.
    """

    method: OptimizerMethod = "cmaes"
    budget: int | None = Field(default=None, ge=1)
    budget_examples: int | None = Field(default=None, ge=1)
    popsize: int = Field(default=8, ge=2)
    sigma: float | None = Field(default=None, gt=0, le=1)
    seed: int = Field(default=0, ge=0)
    start: StartPoint | None = None
    # [lambda points, pcb_ratio points] of a coarse grid scored before the optimizer.
    sweep: list[int] | None = None
    fidelity: Fidelity = Field(default_factory=Fidelity)
    # After the search, the best `rescore` candidates are scored again on each task's
    # rescore split (more data) and the best there is the result: the best of many
    # candidates on a small split is partly luck (winner's curse). 0: off.
    rescore: int = Field(default=0, ge=0)

    @field_validator("sweep")
    @classmethod
    def _sweep(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and (len(value) != 2 or min(value) < 1):
            raise ValueError(
                f"optimizer.sweep: got {value!r}; allowed: [lambda points, pcb_ratio points], "
                "each >= 1"
            )
        return value

    @property
    def candidates(self) -> int | None:
        """The budget in candidates (60 when neither budget key is given)."""
        if self.budget_examples is not None:
            return None
        return 60 if self.budget is None else self.budget

    @property
    def sweep_size(self) -> int:
        return self.sweep[0] * self.sweep[1] if self.sweep else 0

    @property
    def warmup(self) -> int:
        """Candidates scored before the optimizer: the default, the start point, the sweep."""
        return 1 + (self.start is not None) + self.sweep_size


class CacheOptions(_Strict):
    # In-memory budget for inputs the search cannot memory-map (e.g. pickled .bin files).
    memory_gb: float = Field(default=4.0, ge=0)
    dir: str | None = None
    # device: cuda: inputs kept resident on the GPU (default: half its free memory).
    gpu_memory_gb: float | None = Field(default=None, ge=0)


@dataclass(frozen=True)
class MergeInputs:
    """What the merge and the scored model are made of: the part of the config that
    planning, the statistics cache and the evaluators read (not the search's settings)."""

    base_model: str
    models: tuple[str, ...]
    dtype: str
    clamp_ratio: float
    device: str
    trust_remote_code: bool
    tokenizer: str | None  # where the tokenizer loads from (None: base_model)


class EvolveConfig(_Strict):
    base_model: str
    models: list[str] = Field(min_length=1)
    search: SearchSpace = Field(default_factory=SearchSpace)
    parameters: FixedParameters = Field(default_factory=FixedParameters)
    evaluation: Evaluation
    optimizer: Optimizer = Field(default_factory=Optimizer)
    dtype: Literal["float32", "float16", "bfloat16", "float64"] = "float32"
    device: str = "cpu"
    cache: CacheOptions = Field(default_factory=CacheOptions)
    trust_remote_code: bool = False
    # Where the tokenizer comes from (default: base_model). Task types that tokenize
    # (every type but python) fail without one; python tasks get None when none loads.
    tokenizer: str | None = None

    @field_validator("device")
    @classmethod
    def _device_name(cls, value: str) -> str:
        import torch

        try:
            torch.device(value)
        except (RuntimeError, ValueError):
            raise ValueError(
                f"'{value}' is not a torch device; allowed: cpu, cuda, cuda:N, mps, ..."
            ) from None
        return value

    @model_validator(mode="after")
    def _distinct_models(self) -> EvolveConfig:
        if len(set(self.models)) != len(self.models):
            raise ValueError("models: each model may appear once")
        if self.base_model in self.models:
            raise ValueError("models: the base_model must not also be listed in models")
        return self

    @model_validator(mode="after")
    def _prompts_name_models(self) -> EvolveConfig:
        """An agreement task's prompts are keyed by the models exactly as ``models:`` names
        them (before paths resolve): every model has prompts, and no key is a stranger."""
        for task in self.evaluation.tasks:
            if task.type != "agreement":
                continue
            for key in task.prompts:
                if key not in self.models:
                    role = " (the base_model)" if key == self.base_model else ""
                    raise ValueError(
                        f"task '{task.name}': prompts: '{key}'{role} is not one of models"
                        f"{did_you_mean(key, self.models)} (allowed: {', '.join(self.models)})"
                    )
            missing = [m for m in self.models if m not in task.prompts]
            if missing:
                raise ValueError(
                    f"task '{task.name}': prompts: no prompts for model '{missing[0]}'; give "
                    "every model in models a JSONL file (the candidate is compared with each "
                    "expert on its own prompts)"
                )
        return self

    @model_validator(mode="after")
    def _optimizer_fits(self) -> EvolveConfig:
        opt = self.optimizer
        if opt.budget is not None and opt.budget_examples is not None:
            raise ValueError(
                "optimizer.budget_examples: give the budget in candidates (budget) or in "
                "examples scored (budget_examples), not both"
            )
        if opt.sigma is not None and opt.method != "cmaes":
            raise ValueError(
                f"optimizer.sigma: only method cmaes has a step size; method {opt.method} "
                "takes none"
            )
        if opt.candidates is not None and opt.candidates < opt.warmup:
            raise ValueError(
                f"optimizer.budget: {opt.candidates} is less than the {opt.warmup} candidates "
                "scored before the optimizer (the default, start and sweep); raise it to at "
                f"least {opt.warmup}"
            )
        if opt.sweep:
            for name, points in zip(("lambda", "pcb_ratio"), opt.sweep, strict=True):
                if points > 1 and self.search.fixed(name):
                    at = (
                        AUTO
                        if name == "lambda" and self.search.lambda_auto
                        else (self.search.range(name)[0])
                    )
                    raise ValueError(
                        f"optimizer.sweep: {points} {name} points, but search.{name} is fixed "
                        f"at {at}; use 1"
                    )
        # Slices and a budget in examples need each task's size before anything loads.
        needs = [
            (key, why)
            for key, why, on in (
                ("optimizer.fidelity", "the slices are fractions of it", opt.fidelity.rungs > 1),
                ("optimizer.budget_examples", "the budget counts it", opt.budget_examples),
            )
            if on
        ]
        for key, why in needs:
            for task in self.evaluation.tasks:
                missing = {"python": task.examples, "lm_eval": task.limit}.get(task.type, 1)
                if missing is None:
                    size = "examples: N" if task.type == "python" else "limit"
                    raise ValueError(
                        f"{key}: task '{task.name}' ({task.type}) has no '{size}' (how many "
                        f"examples it scores); {why}"
                        + (" (its function then takes limit=n)" if task.type == "python" else "")
                    )
        if opt.rescore:
            if opt.candidates is not None and opt.rescore > opt.candidates:
                raise ValueError(
                    f"optimizer.rescore: {opt.rescore} is more than the budget's "
                    f"{opt.candidates} candidates"
                )
            for task in self.evaluation.tasks:
                if task.rescore_split is None:
                    if task.type == "agreement":
                        raise ValueError(
                            f"optimizer.rescore: task '{task.name}' (agreement) has no rescore "
                            "split (not built); leave optimizer.rescore out"
                        )
                    how = (
                        "rescore_kwargs (the function's keyword arguments for more data)"
                        if task.type == "python"
                        else "limit (the rescore then reads the whole data file)"
                        if task.type == "lm_eval"
                        else "rescore_data (a JSONL file), or limit (the rescore then reads "
                        "the whole data file)"
                    )
                    raise ValueError(
                        f"optimizer.rescore: task '{task.name}' has no rescore split; give it {how}"
                    )
        start = opt.start
        if start is not None:
            given = {"pcb_ratio": start.pcb_ratio, "lambda": start.lambda_}
            weights = start.weight
            if isinstance(weights, list):
                if len(weights) != len(self.models):
                    raise ValueError(
                        f"optimizer.start.weight: {len(weights)} values for "
                        f"{len(self.models)} models; give one per model or one number"
                    )
                given.update({f"weight[{i}]": w for i, w in enumerate(weights)})
            elif weights is not None:
                given["weight"] = weights
            for key, value in given.items():
                if value is None or value == AUTO:
                    continue
                if key == "lambda" and self.search.lambda_auto:
                    raise ValueError(
                        "optimizer.start.lambda: search.lambda is auto (fixed); leave it out"
                    )
                low, high = self.search.range(key.split("[")[0])
                if not low <= value <= high:
                    raise ValueError(
                        f"optimizer.start.{key}: {value} is outside search."
                        f"{key.split('[')[0]} = [{low}, {high}]"
                    )
        return self

    @property
    def inputs(self) -> MergeInputs:
        return MergeInputs(
            base_model=self.base_model,
            models=tuple(self.models),
            dtype=self.dtype,
            clamp_ratio=self.parameters.clamp_ratio,
            device=self.device,
            trust_remote_code=self.trust_remote_code,
            tokenizer=self.tokenizer,
        )

    def fingerprint(self) -> str:
        """Identifies a search for --resume: everything except the optimizer budget."""
        data = self.model_dump(mode="json", by_alias=True, exclude={"cache"})
        data["optimizer"].pop("budget")
        data["optimizer"].pop("budget_examples")
        if data["optimizer"]["sigma"] is None and self.optimizer.method == "cmaes":
            data["optimizer"]["sigma"] = 0.2  # the step size it had before it was optional
        # Keys added later leave the fingerprints of searches that do not use them unchanged.
        for section, key, unset in (
            (data, "tokenizer", None),
            (data["optimizer"], "method", "cmaes"),
            (data["optimizer"], "fidelity", {"rungs": 1, "eta": 3}),
            (data["optimizer"], "start", None),
            (data["optimizer"], "sweep", None),
            (data["optimizer"], "rescore", 0),
            *(
                (t, k, u)
                for t in data["evaluation"]["tasks"]
                for k, u in (
                    ("kwargs", {}),
                    ("test_kwargs", None),
                    ("rescore_data", None),
                    ("rescore_kwargs", None),
                    ("examples", None),
                    *((key, None) for key in AGREEMENT_KEYS),
                )
            ),
        ):
            if section.get(key, unset) == unset:
                section.pop(key, None)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _resolve(path: str, root: Path) -> str:
    """Local paths are relative to the config file; hub ids pass through unchanged."""
    candidate = Path(os.path.expanduser(path))
    if not candidate.is_absolute():
        candidate = root / candidate
    return str(candidate.resolve()) if candidate.exists() else path


def _under(path: str, root: Path) -> str:
    """A folder the search writes (``cache.dir``), relative to the config file like every
    other path in it, whether or not it exists yet (``_resolve`` keeps a missing path
    as written, which the working directory would then have read)."""
    return str((root / os.path.expanduser(path)).resolve())


def import_target(target: str, root: Path | None = None) -> Callable:
    """``module:function`` -> the callable; the config directory is importable."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise EvolveConfigError(f"python target '{target}': expected 'module:function'")
    if root is not None and str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any import failure is the user's to fix, with the cause
        raise EvolveConfigError(
            f"python target '{target}': cannot import module '{module_name}': {exc}"
        ) from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise EvolveConfigError(
            f"python target '{target}': module '{module_name}' has no callable '{attr}'"
        )
    return fn


def load_config(path: os.PathLike, *, check_data: bool = True) -> EvolveConfig:
    """Parse, validate and resolve paths; every error is an :class:`EvolveConfigError`."""
    path = Path(path)
    if not path.is_file():
        raise EvolveConfigError(f"search config '{path}' does not exist")
    try:
        raw = load_yaml(path.read_text(), str(path))
    except ConfigError as exc:
        raise EvolveConfigError(str(exc)) from None
    try:
        cfg = EvolveConfig.model_validate(raw)
    except ValidationError as exc:
        raise EvolveConfigError(f"{path}: {format_validation_error(exc)}") from None
    root = path.resolve().parent
    tasks = []
    for task in cfg.evaluation.tasks:
        update = {}
        for key in ("data", "test_data", "rescore_data", "include_path"):
            value = getattr(task, key)
            if value is not None:
                resolved = Path(_resolve(value, root))
                if not resolved.exists():
                    raise EvolveConfigError(
                        f"task '{task.name}': {key} file '{value}' does not exist "
                        f"(relative paths are read from the YAML's folder {root})"
                    )
                update[key] = str(resolved)
        if task.prompts:  # keyed by the resolved model, as models: resolves
            prompts = {}
            for model, value in task.prompts.items():
                resolved = Path(_resolve(value, root))
                if not resolved.is_file():
                    raise EvolveConfigError(
                        f"task '{task.name}': prompts['{model}'] file '{value}' does not exist "
                        f"(relative paths are read from the YAML's folder {root})"
                    )
                prompts[_resolve(model, root)] = str(resolved)
            update["prompts"] = prompts
        tasks.append(task.model_copy(update=update))
    cfg = cfg.model_copy(
        update={
            "base_model": _resolve(cfg.base_model, root),
            "tokenizer": _resolve(cfg.tokenizer, root) if cfg.tokenizer else None,
            "models": [_resolve(m, root) for m in cfg.models],
            "evaluation": cfg.evaluation.model_copy(update={"tasks": tasks}),
            "cache": cfg.cache.model_copy(
                update={"dir": _under(cfg.cache.dir, root) if cfg.cache.dir else None}
            ),
        }
    )
    if check_data:
        for task in cfg.evaluation.tasks:
            check_task(task, root, sliced=cfg.optimizer.fidelity.rungs > 1)
    return cfg


def _check_call(task: TaskSpec, target: str, kwargs: dict[str, Any], root: Path) -> None:
    """The function imports and accepts ``(model, tokenizer, **kwargs)``, before any model loads."""
    fn = import_target(target, root)
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins have no signature: nothing to check
        return
    try:
        signature.bind(None, None, **kwargs)
    except TypeError as exc:
        given = ", ".join(sorted(kwargs)) or "none"
        raise EvolveConfigError(
            f"task '{task.name}': {target}{signature} cannot be called as "
            f"(model, tokenizer, **kwargs) with kwargs {given}: {exc}"
        ) from None


def available_devices() -> list[str]:
    import torch

    found = ["cpu"]
    if torch.cuda.is_available():
        found += ["cuda", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append("mps")
    return found


def check_device(device: str) -> None:
    """The device is on this machine (torch's own failure is an assertion deep in loading)."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise EvolveConfigError(
            f"device: '{device}' is not a torch device; allowed here: "
            f"{', '.join(available_devices())}"
        ) from None
    if parsed.type == "cpu":
        return
    if parsed.type == "mps":
        backend = getattr(torch.backends, "mps", None)
        count = 1 if backend is not None and backend.is_available() else 0
    else:
        backend = getattr(torch, parsed.type, None)
        available = backend is not None and backend.is_available()
        count = backend.device_count() if available else 0
    if count == 0:
        why = f"torch {torch.__version__} sees no {parsed.type} device"
        if parsed.type == "cuda" and torch.version.cuda is None:
            why = f"torch {torch.__version__} is built without CUDA"
    elif parsed.index is not None and parsed.index >= count:
        why = f"there are {count} {parsed.type} device(s)"
    else:
        return
    raise EvolveConfigError(
        f"device: '{device}' is not available ({why}); allowed here: "
        f"{', '.join(available_devices())}"
    )


def check_inputs(cfg: EvolveConfig, root: Path | None, *, device: bool = True) -> None:
    """What the machine must provide, checked before OUT_DIR is touched: every model is
    found (relative paths from the YAML's folder ``root``) and the device exists
    (``device=False`` where remote workers score, e.g. a Ray cluster)."""
    from mergekit_pcb.model_paths import Folders, check_models

    cwd = Path.cwd()
    if root is None:
        folders = Folders(cwd, f"the working directory {cwd}")
    else:
        folders = Folders(
            root,
            f"the YAML's folder {root}",
            cwd if cwd != root else None,
            f"the working directory {cwd}",
        )
    references = [("base_model", cfg.base_model)]
    references += [(f"models[{i}]", model) for i, model in enumerate(cfg.models)]
    try:
        check_models(references, folders)
    except ConfigError as exc:
        raise EvolveConfigError(str(exc)) from None
    if device:
        check_device(cfg.device)


def check_task(task: TaskSpec, root: Path, *, sliced: bool = False) -> None:
    """Reads every data line once, so a malformed line fails now, with file and line;
    a python task's function must take its kwargs (and ``limit`` when ``sliced``)."""
    if task.type in NEEDS_DATA:
        for key in ("data", "test_data", "rescore_data"):
            if getattr(task, key):
                try:
                    read_jsonl(getattr(task, key), task.type)
                except DataError as exc:
                    raise EvolveConfigError(f"task '{task.name}': {exc}") from None
    elif task.type == "agreement":
        for model, path in task.prompts.items():
            try:
                read_jsonl(path, "agreement")
            except DataError as exc:
                raise EvolveConfigError(f"task '{task.name}': prompts['{model}']: {exc}") from None
    elif task.type == "python":
        extra = {"limit": 1} if sliced else {}
        _check_call(task, task.function, {**task.call_kwargs("search"), **extra}, root)
        if task.test_function:
            _check_call(task, task.test_function, task.call_kwargs("test"), root)
        if task.rescore_kwargs is not None:
            _check_call(task, task.function, task.call_kwargs("rescore"), root)
    elif task.type == "lm_eval":
        try:
            import lm_eval  # noqa: F401
        except ImportError as exc:
            raise EvolveConfigError(
                f"task '{task.name}' of type lm_eval needs lm-evaluation-harness: "
                "pip install 'mergekit-pcb[lm-eval]'"
            ) from exc
