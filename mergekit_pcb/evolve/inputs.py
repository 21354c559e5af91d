"""Step 2 of the search: where each input tensor of a merge lives on disk, and its
memory-mapped view.

Why: a candidate recomputes its merge from the inputs (:mod:`.candidate`), so the
search must read them again and again without holding them. A safetensors file
is mapped once; a tensor is a view of the mapping (no copy, the pages are the
OS page cache's, shared with every other process reading the file), and its
pages leave this process's resident set once it is merged (``MADV_DONTNEED``).

The view must hold exactly the tensor that mergekit hands to the merge method:
mergekit's loader for the model (its ``LoaderCache``, so LoRA merges and hub
snapshots resolve as they do for mergekit), the first of the name, its aliases
and its tied names that the model's index holds, and mergekit's cast to the
merge's ``dtype``. Inputs it reaches another way (a pickled ``.bin`` shard, a
converted checkpoint, an unusual dtype) resolve to None: the cache then keeps
the tensors as mergekit loaded them (:mod:`.cache`).
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import threading
from dataclasses import dataclass

import torch

_DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
}
_DTYPE_NAMES = {
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
    torch.float32: "float32",
    torch.float64: "float64",
}
_BY_NAME = {name: dtype for dtype, name in _DTYPE_NAMES.items()}


@dataclass(frozen=True)
class InputRef:
    """One input tensor: a safetensors file, the tensor's key there, and the dtype the
    merge receives it in (mergekit casts to the merge's ``dtype``)."""

    path: str
    key: str
    dtype: str

    def to_json(self) -> list:
        return [self.path, self.key, self.dtype]

    @classmethod
    def from_json(cls, data: list) -> InputRef:
        return cls(*data)


class SafetensorsFile:
    """A safetensors file mapped read-only (copy-on-write, never written)."""

    def __init__(self, path: str):
        with open(path, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(length))
            self._map = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
        header.pop("__metadata__", None)
        self.entries: dict[str, dict] = header
        self._start = 8 + length

    def dtype(self, key: str) -> torch.dtype | None:
        return _DTYPES.get(self.entries[key]["dtype"])

    def tensor(self, key: str) -> torch.Tensor:
        """The tensor as stored: a view of the mapping (a copy only if misaligned)."""
        entry = self.entries[key]
        dtype = _DTYPES[entry["dtype"]]
        begin, end = entry["data_offsets"]
        count = (end - begin) // dtype.itemsize
        shape = entry["shape"]
        if count == 0:
            return torch.empty(shape, dtype=dtype)
        offset = self._start + begin
        if offset % dtype.itemsize:
            raw = torch.frombuffer(self._map, dtype=torch.uint8, count=end - begin, offset=offset)
            return raw.clone().view(dtype).view(shape)
        return torch.frombuffer(self._map, dtype=dtype, count=count, offset=offset).view(shape)

    def release(self, key: str) -> None:
        """Drops the tensor's pages from this process (they stay in the page cache)."""
        begin, end = self.entries[key]["data_offsets"]
        first = (self._start + begin) // mmap.PAGESIZE * mmap.PAGESIZE
        last = self._start + end
        advice = getattr(mmap, "MADV_DONTNEED", None)  # not on every platform
        if last > first and advice is not None:
            self._map.madvise(advice, first, last - first)


_files: dict[str, SafetensorsFile] = {}
_files_lock = threading.Lock()


def open_file(path: str) -> SafetensorsFile:
    """The mapping of ``path``, made once per process."""
    with _files_lock:
        found = _files.get(path)
        if found is None:
            found = _files[path] = SafetensorsFile(path)
        return found


def load(ref: InputRef) -> torch.Tensor:
    """The tensor as the merge receives it (a view of the file unless cast)."""
    stored = open_file(ref.path).tensor(ref.key)
    dtype = _BY_NAME[ref.dtype]
    return stored if stored.dtype == dtype else stored.to(dtype)


def release(ref: InputRef) -> None:
    open_file(ref.path).release(ref.key)


def dtype_name(dtype: torch.dtype) -> str | None:
    return _DTYPE_NAMES.get(dtype)


def resolve(planned) -> list[InputRef] | None:
    """The base's and each expert's :class:`InputRef` (in ``planned.rows`` order) for a
    tensor as mergekit plans it, or None if some input is not a plain safetensors
    tensor of a float dtype (see the module docstring)."""
    from mergekit.common import dtype_from_name
    from mergekit.io.tasks import LoaderCache

    task = planned.task
    loads = {load.model: load for load in task.gather_tensors.arguments().values()}
    models = [task.base_model] + [m for m in task.model_order if m != task.base_model]
    refs = []
    for model in models:
        load_task = loads.get(model)
        if load_task is None or load_task.device not in (None, "cpu"):
            return None
        index = LoaderCache().get(model).index
        names = [load_task.tensor, *(load_task.aliases or ()), *(load_task.tied_names or ())]
        name = next((x for x in names if x in index.tensor_paths), None)
        if name is None:
            return None
        path = os.path.join(index.base_path, index.tensor_paths[name])
        if not path.endswith(".safetensors") or not os.path.isfile(path):
            return None
        stored = open_file(path).dtype(name)
        wanted = dtype_from_name(load_task.dtype) if load_task.dtype else stored
        if stored is None or dtype_name(wanted) is None:
            return None
        refs.append(InputRef(path, name, dtype_name(wanted)))
    return refs
