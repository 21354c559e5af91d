"""Whether every model a config names can be found, checked before anything is loaded or written.

mergekit and transformers hand each path that is not an existing folder to the Hugging
Face Hub. A mistyped local path then ends in the Hub's "Repo id must be in the form ...",
and a mistyped name without network in ~27 s of retries; neither says that no such folder
exists. Here each reference is resolved the way the command will resolve it, and a miss
is one line naming the path, the folder it was resolved against and, where the other
folder a user may have meant holds it, that folder. For a name that can only be a Hub id
the Hub is asked once, briefly (never with HF_HUB_OFFLINE set): mergekit 0.1.5 lists a Hub
model's files online before every merge, even when the model is in the local cache, so
without an answer from the Hub such a merge cannot start.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergekit_pcb.config_errors import ConfigError, one_line

HUB_TIMEOUT_S = 3.0  # one request; huggingface_hub itself retries for ~27 s
_TRUE = {"1", "ON", "YES", "TRUE"}
_probe: dict[str, str | None] = {}  # the Hub is asked at most once per process


@dataclass(frozen=True)
class Folders:
    """Where relative paths are read from, and the other folder a user may have meant."""

    root: Path
    root_name: str  # e.g. "the working directory /x, as mergekit-yaml does"
    other: Path | None = None
    other_name: str = ""  # e.g. "the YAML's folder /y"


def merge_folders(config_file: str | None = None) -> Folders:
    """mergekit's rule for a merge config: relative paths are read from the working
    directory (as ``mergekit-yaml`` reads them); the YAML's folder, where known and
    different, is the other folder a user may have meant."""
    cwd = Path.cwd()
    own = Path(config_file).resolve().parent if config_file else None
    return Folders(
        cwd,
        f"the working directory {cwd}, as mergekit-yaml does",
        own if own != cwd else None,
        f"the YAML's folder {own}",
    )


def _looks_local(path: str) -> bool:
    """A path no Hub id can be: absolute, ./ ../ ~, or not of the form 'name' / 'org/name'."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if os.path.isabs(path) or path in (".", "..") or path.startswith(("./", "../", "~")):
        return True
    try:
        validate_repo_id(path)
    except HFValidationError:
        return True
    return False


def offline() -> bool:
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    return bool(constants.HF_HUB_OFFLINE) or any((f or "").upper() in _TRUE for f in flags)


def hub_problem() -> str | None:
    """Why the Hub cannot be asked now (offline mode, or no answer), or None."""
    if offline():
        return "HF_HUB_OFFLINE is set, so the Hub was not asked"
    if "hub" not in _probe:
        from huggingface_hub import constants, get_session

        try:
            get_session().head(constants.ENDPOINT, timeout=HUB_TIMEOUT_S)
            _probe["hub"] = None
        except Exception as error:  # any failure to get an answer means: unreachable
            _probe["hub"] = (
                f"the Hugging Face Hub ({constants.ENDPOINT}) could not be reached "
                f"({one_line(error)}; set HF_HUB_OFFLINE=1 to skip asking it)"
            )
    return _probe["hub"]


def _check_path(where: str, path: str, folders: Folders) -> None:
    """A one-line ConfigError where ``path`` names no local folder and no reachable Hub id."""
    expanded = os.path.expanduser(path)
    relative = not os.path.isabs(expanded)
    target = Path(os.path.normpath(folders.root / expanded if relative else expanded))
    if target.is_dir():
        return
    other = None
    if relative and folders.other is not None:
        candidate = Path(os.path.normpath(folders.other / expanded))
        other = candidate if candidate.is_dir() else None
    read_from = f" (relative paths are read from {folders.root_name})" if relative else ""
    if target.exists():
        raise ConfigError(f"{where}: model '{path}': {target} is a file, not a model folder")
    if other is not None or _looks_local(path):
        hint = ""
        if other is not None:
            hint = f"; {folders.other_name} has one: write it as {other}"
        raise ConfigError(
            f"{where}: model '{path}': no such local folder {target}{read_from}{hint}"
        )
    problem = hub_problem()
    if problem is not None:  # else a Hub id, which the Hub answers for
        raise ConfigError(
            f"{where}: model '{path}': no local folder {target}{read_from}, and as a Hugging "
            f"Face Hub id it needs the Hub (mergekit lists its files there even when cached), "
            f"but {problem}"
        )


def check_models(references: Iterable[tuple[str, Any]], folders: Folders) -> None:
    """Each ``(where, reference)``, a mergekit ``ModelReference`` or its string form
    (``path[@revision][+lora]``); raises :class:`ConfigError` on the first miss."""
    from mergekit.common import ModelReference

    seen = set()
    for where, reference in references:
        if isinstance(reference, str):
            reference = ModelReference.parse(reference)
        parts = [(where, reference.model)]
        if reference.lora is not None:
            parts.append((f"{where} (LoRA)", reference.lora))
        for label, model in parts:
            if model.path not in seen:
                seen.add(model.path)
                _check_path(label, model.path, folders)


def merge_config_references(config: Any) -> list[tuple[str, Any]]:
    """Every model a mergekit ``MergeConfiguration`` names, with where it is named."""
    found: list[tuple[str, Any]] = []

    def add(where: str, reference: Any) -> None:
        if reference is not None:
            found.append((where, reference))

    def models(items: Any, where: str) -> None:
        for i, item in enumerate(items or []):
            add(f"{where}[{i}].model", item.model)

    def slices(items: Any, where: str) -> None:
        for i, item in enumerate(items or []):
            add(f"{where}[{i}].base_model", item.base_model)
            for j, source in enumerate(item.sources or []):
                add(f"{where}[{i}].sources[{j}].model", source.model)

    add("base_model", config.base_model)
    models(config.models, "models")
    slices(config.slices, "slices")
    for name, module in (config.modules or {}).items():
        models(module.models, f"modules.{name}.models")
        slices(module.slices, f"modules.{name}.slices")
    return found
