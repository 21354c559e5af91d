"""Token ids, padding and devices: what every scorer that tokenizes shares (the labelled
task types of :mod:`.tasks` and the label-free :mod:`.agreement`), in one module both
import, so neither imports the other's internals."""

from __future__ import annotations

import torch


def ids(tokenizer, text: str, *, bos: bool) -> list[int]:
    """Token ids with BOS in front when the tokenizer has one and does not add it itself."""
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    b = tokenizer.bos_token_id
    if bos and b is not None and (not ids or ids[0] != b):
        ids = [b, *ids]
    return ids


def pad(rows: list[list[int]], pad: int, *, left: bool = False):
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, sl] = torch.tensor(r, dtype=torch.long)
        mask[i, sl] = 1
    return ids, mask


def device_of(model) -> torch.device:
    return next(model.parameters()).device


def pad_id(tokenizer) -> int:
    for t in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if t is not None:
            return t
    return 0


def greedy(
    model, prompts: list[list[int]], pad_token: int, eos, max_new_tokens: int, batch_size: int
):
    """Each prompt's greedy continuation (token ids, up to and with the first ``eos``), in
    batches of left-padded prompts: what exact_match compares and agreement scores."""
    dev = device_of(model)
    out = []
    for start in range(0, len(prompts), batch_size):
        batch, mask = pad(prompts[start : start + batch_size], pad_token, left=True)
        generated = model.generate(
            input_ids=batch.to(dev),
            attention_mask=mask.to(dev),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad_token,
            eos_token_id=eos,
        )[:, batch.shape[1] :].tolist()
        out += [
            row[: row.index(eos) + 1] if eos is not None and eos in row else row
            for row in generated
        ]
    return out
