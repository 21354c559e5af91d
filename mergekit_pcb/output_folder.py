"""The output folder of ``mergekit-pcb merge`` and ``demo``: refuse to mix models, clean an
interrupted write; and the one wording every command uses to refuse a previous run.

mergekit writes into whatever OUT_PATH holds. A stale ``model.safetensors.index.json``
of an earlier sharded merge then survives next to the new ``model.safetensors``, and
loaders follow it to the old shards. A merge killed while writing leaves mergekit's
temporary shards: ``TensorWriter`` writes ``{model|pytorch_model}-{n}.{safetensors|bin}``
(n = 1, 2, ..., not zero-padded) and renames them to their final names
(``model.safetensors`` or ``model-00001-of-0000N.safetensors``) only once every shard is
written, so a rerun that writes fewer shards never removes the rest.

So before merging: a folder that holds model files is refused unless ``--overwrite``
(which removes those weights and index files first), and temporary shards are removed
as what they are. Only files named exactly as mergekit names its temporaries (and, for
safetensors, carrying the metadata mergekit writes) count; nothing else is ever deleted
without ``--overwrite``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from mergekit_pcb.config_errors import ConfigError

LOG = logging.getLogger(__name__)

# mergekit/io/tensor_writer.py: f"{prefix}-{shard_index + 1}.{extension}", prefix "model"
# (safetensors) or "pytorch_model" (pickle); final names contain "-of-" or no number.
TEMPORARY = re.compile(r"(model-[1-9][0-9]*\.safetensors|pytorch_model-[1-9][0-9]*\.bin)")
MERGEKIT_METADATA = {"format": "pt"}  # what TensorWriter._save_st writes into every shard


def is_model_file(name: str) -> bool:
    """Weights or a weight index of a Hugging Face model folder."""
    return name.endswith((".safetensors", ".safetensors.index.json", ".bin.index.json")) or (
        name.startswith("pytorch_model") and name.endswith(".bin")
    )


def _safetensors_metadata(path: Path) -> dict | None:
    """The header's ``__metadata__``; None where a killed write cut the header short."""
    with path.open("rb") as file:
        head = file.read(8)
        if len(head) < 8:
            return None
        (size,) = struct.unpack("<Q", head)
        header = file.read(min(size, 100_000_000))
    if len(header) < size:
        return None
    try:
        return json.loads(header).get("__metadata__", {})
    except (ValueError, AttributeError):
        return {}


def is_temporary_shard(path: Path) -> bool:
    """A shard mergekit wrote but never renamed: its write was interrupted."""
    if not path.is_file() or not TEMPORARY.fullmatch(path.name):
        return False
    if path.suffix != ".safetensors":
        return True
    metadata = _safetensors_metadata(path)
    return metadata is None or metadata == MERGEKIT_METADATA


def previous_run(path: Path, holds: str, names: list[str], why: str, allowed: str) -> str:
    """The one wording of every command that will not write over a previous run in its
    output folder (merge, demo and inspect: ``--overwrite``; evolve: ``--resume``)."""
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    return f"output folder {path} already holds {holds} ({shown}); {why}. Allowed: {allowed}"


@dataclass(frozen=True)
class OutputFolder:
    path: Path
    temporary: tuple[Path, ...]  # shards of an interrupted mergekit write
    model_files: tuple[Path, ...]  # weights and indexes of a model already there

    @classmethod
    def inspect(cls, path: Path) -> OutputFolder:
        """What the folder holds; reads only."""
        if not path.is_dir():
            return cls(path, (), ())
        files = sorted(p for p in path.iterdir() if p.is_file())
        temporary = tuple(p for p in files if is_temporary_shard(p))
        model = tuple(p for p in files if is_model_file(p.name) and p not in temporary)
        return cls(path, temporary, model)

    def check(self, overwrite: bool, inputs: list[Path]) -> None:
        """Refuse a folder that is an input model's, or holds a model, unless overwriting."""
        here = self.path.resolve()
        for model in inputs:
            if model.resolve() == here:
                raise ConfigError(
                    f"output folder {self.path} is the folder of input model '{model}'; "
                    "allowed: a new or empty folder"
                )
        if self.model_files and not overwrite:
            raise ConfigError(
                previous_run(
                    self.path,
                    "model files",
                    [p.name for p in self.model_files],
                    "mergekit would write the new model among them",
                    "--overwrite (removes those weights and index files first) or another folder",
                )
            )

    def clear(self, overwrite: bool) -> list[str]:
        """Remove the temporary shards (and, with ``overwrite``, the model files); the names."""
        doomed = [*self.temporary, *(self.model_files if overwrite else ())]
        for path in doomed:
            os.remove(path)
        return [p.name for p in doomed]


def prepare(path: Path, overwrite: bool, inputs: list[Path]) -> None:
    """Check the folder a merge will write (:meth:`OutputFolder.check`, a ConfigError),
    then remove an interrupted merge's temporary shards and, with ``overwrite``, the
    earlier model's files, saying what was removed."""
    output = OutputFolder.inspect(path)
    output.check(overwrite, inputs)
    temporary = {p.name for p in output.temporary}
    removed = output.clear(overwrite)
    if temporary:
        LOG.warning(
            "removed %d temporary shard(s) that an interrupted merge left in %s: %s",
            len(temporary),
            path,
            ", ".join(sorted(temporary)),
        )
    if len(removed) > len(temporary):
        LOG.warning(
            "--overwrite: removed the earlier model's files from %s: %s",
            path,
            ", ".join(name for name in removed if name not in temporary),
        )
