"""Build the tiny models that examples/evolve.yml searches over (no download).

    python examples/data/make_models.py examples/models

A random base and two experts really fine-tuned from it on toy tasks (``max``,
``cipher`` from benchmarks/toy.py), with the character tokenizer saved alongside. The
fine-tuning (150 steps per expert) takes most of the ~45 s this needs on 2 CPU cores.
"""

import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import toy

from mergekit_pcb.tiny import new_llama, save_model, tiny_llama_config

out = Path(sys.argv[1] if len(sys.argv) > 1 else "examples/models")
tokenizer = toy.toy_tokenizer()
config = tiny_llama_config(len(tokenizer), hidden_size=48, num_layers=2, max_position_embeddings=32)
base = new_llama(config, seed=0)
save_model(base, out / "base", tokenizer)
for i, task in enumerate(("max", "cipher")):
    expert = copy.deepcopy(base)
    toy.train(
        expert,
        tokenizer,
        toy.make_examples(task, 400, 1),
        steps=150,
        lr=3e-3,
        batch_size=32,
        seed=i,
    )
    save_model(expert, out / task, tokenizer)
print(f"wrote {out}/base, {out}/max, {out}/cipher")
