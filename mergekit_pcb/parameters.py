"""Every pcb parameter once: name, default, domain, meaning and the error that names it.

The method's mergekit specs, the strict config check, the demo's options, the
search's ranges and defaults, and the ``mergekit-evolve`` patch all read these
objects, so a default or a domain changes in one line here and nowhere else.
Nothing here imports mergekit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pydantic import TypeAdapter, ValidationError

_FLOAT = TypeAdapter(float)


@dataclass(frozen=True)
class Parameter:
    """One parameter of ``merge_method: pcb``."""

    name: str
    default: float | str
    domain: str  # the allowed values in a few words, e.g. "a number in (0, 1]"
    description: str  # what the value means
    per_model: bool = False  # set per model (mergekit's NON_BASE scope), else shared
    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] = ()  # a string choice instead of a number
    keywords: tuple[str, ...] = ()  # strings accepted besides numbers (lambda: auto)

    @property
    def number_domain(self) -> str:
        """The domain of the numbers alone (where a keyword such as auto does not apply)."""
        words = " or ".join(self.keywords)
        return self.domain.removesuffix(f" or {words}") if words else self.domain

    @property
    def allowed(self) -> str:
        """The end of every error about this parameter."""
        return f"{self.domain}, {self.description}"

    def contains(self, value: float | str) -> bool:
        if self.choices or isinstance(value, str):
            return value in self.choices or value in self.keywords
        if not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def error(self, value: Any) -> str:
        where = "per-model " if self.per_model else ""
        return f"pcb: {where}parameter '{self.name}' got {value!r}; allowed: {self.allowed}"

    def check(self, value: Any) -> float | str:
        """The value as the merge uses it, or a ValueError saying what is allowed.

        Numbers are converted as pydantic does for mergekit's own parameters (an int
        or a numeric string is a float), except that a boolean is never a number.
        """
        if self.choices:
            if isinstance(value, str) and value in self.choices:
                return value
            raise ValueError(self.error(value))
        if isinstance(value, str) and value in self.keywords:
            return value
        number = None
        if not isinstance(value, bool):
            try:
                number = _FLOAT.validate_python(value)
            except ValidationError:
                pass
        if number is None or not self.contains(number):
            raise ValueError(self.error(value))
        return number


PCB_RATIO = Parameter(
    "pcb_ratio",
    default=0.1,
    domain="a number in (0, 1] or auto",
    description=(
        "the fraction of entries each model keeps (auto: per tensor, the one of 0.1, 0.2, "
        "0.4, 0.7 whose merge points most along the sum of the task vectors)"
    ),
    low=0.0,
    low_open=True,
    high=1.0,
    keywords=("auto",),
)
CLAMP_RATIO = Parameter(
    "clamp_ratio",
    default=1e-4,
    domain="a number in [0, 0.5)",
    description="the quantile clipped at each end of |task vector|",
    low=0.0,
    high=0.5,
    high_open=True,
)
LAMBDA = Parameter(
    "lambda",
    default=1.0,
    domain="a finite number or auto",
    description=(
        "the scale of the merged task vector (auto: per tensor, the scale at which it "
        "best matches the sum of the task vectors)"
    ),
    keywords=("auto",),
)
WEIGHT = Parameter(
    "weight",
    default=1.0,
    domain="a finite number",
    description="this model's task coefficient",
    per_model=True,
)
PCB_SCOPE = Parameter(
    "pcb_scope",
    default="tensor",
    domain="one of tensor, model",
    description=(
        "where PCB takes its statistics: per tensor, or over all tensors of each model "
        "as in the paper's code"
    ),
    choices=("tensor", "model"),
)

ALL = (PCB_RATIO, CLAMP_RATIO, LAMBDA, WEIGHT, PCB_SCOPE)
BY_NAME = {p.name: p for p in ALL}
