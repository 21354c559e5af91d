"""Step 4 of the search: scoring a round's candidates in parallel on Ray actors.

Each actor loads the model once and opens the on-disk statistics cache; the inputs
are memory-mapped, so actors on one machine share the page cache. Per candidate only
the values travel. With ``--ray-address`` the cache directory must be visible to every node
(a shared filesystem).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from mergekit_pcb.evolve.config import MergeInputs, TaskSpec
from mergekit_pcb.evolve.evaluator import Result
from mergekit_pcb.evolve.layout import Values
from mergekit_pcb.evolve.pool import Done


def _ray():
    try:
        import ray
    except ImportError as exc:
        raise RuntimeError("--ray needs Ray: pip install 'mergekit-pcb[ray]'") from exc
    return ray


class _Actor:
    def __init__(
        self,
        inputs: MergeInputs,
        tasks: list[dict],
        gpu_memory_gb: float | None,
        cache_root: str,
        key: str,
        root: str | None,
        threads: int,
        outputs: dict | None = None,
    ):
        import torch

        from mergekit_pcb.evolve.cache import TensorCache
        from mergekit_pcb.evolve.evaluator import Evaluator

        torch.set_num_threads(threads)
        cache = TensorCache.open(cache_root, key)
        if cache is None:
            raise RuntimeError(f"Ray actor: no complete statistics cache at {cache_root}")
        specs = [TaskSpec.model_validate(t) for t in tasks]
        self.evaluator = Evaluator(
            inputs, specs, cache, Path(root) if root else None, gpu_memory_gb, outputs
        )

    def evaluate(self, values: dict, split: str, limits: dict | None):
        return tuple(self.evaluator.evaluate(Values.from_json(values), split, limits))


class RayPool:
    def __init__(
        self,
        inputs: MergeInputs,
        tasks: Sequence[TaskSpec],
        gpu_memory_gb: float | None,
        cache_root: Path,
        key: str,
        root: Path | None,
        *,
        address: str | None,
        num_cpus: int | None,
        actors: int | None,
        threads_per_actor: int = 1,
        outputs: Mapping[str, Sequence[str]] | None = None,
    ):
        ray = _ray()
        self._started = not ray.is_initialized()
        if self._started:
            if address:
                ray.init(address=address, log_to_driver=False)
            else:
                ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
        count = actors or max(1, int(ray.cluster_resources().get("CPU", 1)) // threads_per_actor)
        remote = ray.remote(num_cpus=threads_per_actor)(_Actor)
        payload = [t.model_dump(mode="json", by_alias=True) for t in tasks]
        self.actors = [
            remote.remote(
                inputs,
                payload,
                gpu_memory_gb,
                str(cache_root),
                key,
                str(root) if root else None,
                threads_per_actor,
                {k: list(v) for k, v in outputs.items()} if outputs else None,
            )
            for _ in range(count)
        ]
        self.ray = ray

    def evaluate(
        self,
        batch: list[Values],
        split: str = "search",
        done: Done | None = None,
        limits: Mapping[str, int] | None = None,
    ) -> list[Result]:
        ray = self.ray
        sliced = dict(limits) if limits else None
        futures = [
            self.actors[i % len(self.actors)].evaluate.remote(v.to_json(), split, sliced)
            for i, v in enumerate(batch)
        ]
        index = {f: i for i, f in enumerate(futures)}
        results: list[Result | None] = [None] * len(batch)
        pending = list(futures)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for f in ready:
                i = index[f]
                results[i] = Result(*ray.get(f))
                if done:
                    done(i, results[i])
        return results  # type: ignore[return-value]

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        if self._started:
            self.ray.shutdown()
