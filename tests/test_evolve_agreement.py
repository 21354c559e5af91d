"""The label-free ``agreement`` task: its KL against a slow reference written here, the
cache of the experts' outputs (reused, bounded, invalidated), bad input as one line
naming the key, and a search with successive halving and ``--resume``."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_tool
from evolve_support import family as toy_family
from evolve_support import search_config, write_config

from mergekit_pcb.evolve import agreement
from mergekit_pcb.evolve.config import EvolveConfigError, MergeInputs, TaskSpec, load_config
from mergekit_pcb.evolve.search import RunOptions, run_search

PROMPTS = 12  # a task's prompts per expert


@pytest.fixture(scope="module")
def toy():
    return toy_family()


def _prompts(toy, folder: Path, n: int = PROMPTS) -> dict[str, str]:
    """Each expert's unlabelled prompts: its own task's inputs, without the answers."""
    import toy as toy_tasks

    paths = {}
    for task, expert in zip(("max", "cipher"), toy["experts"], strict=True):
        path = folder / f"{task}-prompts.jsonl"
        rows = toy_tasks.make_examples(task, n, 11)
        path.write_text("".join(json.dumps({"text": ex.prompt}) + "\n" for ex in rows))
        paths[expert] = str(path)
    return paths


# -- the KL, against a slow reference ----------------------------------------------------


def _softmax(logits: list[float]) -> list[float]:
    top = max(logits)
    e = [math.exp(x - top) for x in logits]
    return [x / sum(e) for x in e]


def _kl_by_hand(expert_logits: list[float], candidate_logits: list[float], k: int) -> float:
    """KL(expert || candidate) over the expert's top-k tokens and one bucket for the rest."""
    p, q = _softmax(expert_logits), _softmax(candidate_logits)
    top = sorted(range(len(p)), key=lambda i: -p[i])[:k]
    kl = sum(p[i] * math.log(p[i] / q[i]) for i in top)
    p_rest = sum(p[i] for i in range(len(p)) if i not in top)
    q_rest = sum(q[i] for i in range(len(q)) if i not in top)
    if p_rest > 0:
        kl += p_rest * math.log(p_rest / q_rest)
    return kl


@pytest.mark.parametrize("k", [1, 3, 7])
def test_kl_top_k_equals_the_hand_computed_kl(k):
    generator = torch.Generator().manual_seed(k)
    expert = 3 * torch.randn(5, 7, generator=generator)
    candidate = expert + torch.randn(5, 7, generator=generator)
    values, indices, tail = agreement.top_k_outputs(expert.log_softmax(-1), k)
    got = agreement.kl_top_k(values, indices, tail, candidate.log_softmax(-1))
    want = [_kl_by_hand(e.tolist(), c.tolist(), k) for e, c in zip(expert, candidate, strict=True)]
    assert got.tolist() == pytest.approx(want, rel=1e-5, abs=1e-7)
    if k == 7:  # the whole vocabulary: the full KL
        full = torch.nn.functional.kl_div(
            candidate.log_softmax(-1), expert.log_softmax(-1), log_target=True, reduction="none"
        ).sum(-1)
        assert got.tolist() == pytest.approx(full.tolist(), rel=1e-5, abs=1e-7)
    same = agreement.kl_top_k(values, indices, tail, expert.log_softmax(-1))
    assert same.abs().max() < 1e-6  # the expert against itself


def _reference_score(toy, prompts: dict[str, str], model, k: int, max_new: int, taken):
    """Mean over experts of the mean KL per token, each prompt run alone: the expert's greedy
    continuation by argmax, the KL by hand in float64 on full distributions."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(toy["base"])
    means = []
    for (expert_dir, path), n in zip(prompts.items(), taken, strict=True):
        if not n:
            continue
        expert = AutoModelForCausalLM.from_pretrained(expert_dir, dtype=torch.float32).eval()
        total, count = 0.0, 0
        for line in Path(path).read_text().splitlines()[:n]:
            seq = [tok.bos_token_id, *[tok.get_vocab()[c] for c in json.loads(line)["text"]]]
            first = len(seq) - 1 if max_new else 0  # 0: the prompt's own tokens
            with torch.no_grad():
                for _ in range(max_new):
                    nxt = int(expert(input_ids=torch.tensor([seq])).logits[0, -1].argmax())
                    seq.append(nxt)
                    if nxt == tok.eos_token_id:
                        break
                p = expert(input_ids=torch.tensor([seq])).logits[0].double()
                q = model(input_ids=torch.tensor([seq])).logits[0].double()
            for pos in range(first, len(seq) - 1):
                total += _kl_by_hand(p[pos].tolist(), q[pos].tolist(), k)
                count += 1
        means.append(total / count)
    return sum(means) / len(means)


def _inputs(toy, models=None) -> MergeInputs:
    return MergeInputs(
        toy["base"], tuple(models or toy["experts"]), "float32", 0.001, "cpu", False, None
    )


def _spec(prompts: dict[str, str], **keys) -> TaskSpec:
    return TaskSpec(name="agree", type="agreement", prompts=prompts, **keys)


@pytest.mark.parametrize(("limit", "max_new"), [(None, 6), (3, 6), (None, 0)])
def test_the_scorer_equals_the_slow_reference(toy, tmp_path, limit, max_new):
    """The cached top-k outputs (batched, padded) scored against the base model equal the
    reference; a slice is the first ``limit`` prompts of the round-robin over experts;
    ``max_new_tokens: 0`` scores the prompts' own tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompts = _prompts(toy, tmp_path, 5)
    spec = _spec(prompts, top_k=4, max_new_tokens=max_new, batch_size=2)
    tok = AutoTokenizer.from_pretrained(toy["base"])
    built = agreement.build([spec], _inputs(toy), tok, tmp_path / "cache")
    model = AutoModelForCausalLM.from_pretrained(toy["base"], dtype=torch.float32).eval()
    score, examples = agreement.scorer_for(spec, built.entries, tok, limit)(model)
    taken = agreement.interleave([5, 5], limit)
    assert taken == ([5, 5] if limit is None else [2, 1])
    assert examples == sum(taken)
    reference = _reference_score(toy, prompts, model, 4, max_new, taken)
    assert score == pytest.approx(reference, rel=1e-4)
    expert = AutoModelForCausalLM.from_pretrained(toy["experts"][0], dtype=torch.float32).eval()
    only_first = {k: v for k, v in built.entries.items()}
    only_first["agree"] = only_first["agree"][:1]
    assert agreement.scorer_for(spec, only_first, tok, None)(expert)[0] < 1e-5  # itself


# -- the cache ------------------------------------------------------------------------------


def test_the_cache_is_reused_bounded_and_invalidated_when_an_expert_changes(toy, tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(toy["base"])
    copy = tmp_path / "expert-copy"
    shutil.copytree(toy["experts"][0], copy)
    models = [str(copy), toy["experts"][1]]
    prompts = dict(zip(models, _prompts(toy, tmp_path, 4).values(), strict=True))
    spec, inputs, cache = _spec(prompts, top_k=3), _inputs(toy, models), tmp_path / "cache"

    def built():
        b = agreement.build([spec], inputs, tok, cache)
        return b, [json.loads((Path(p) / agreement.META).read_text()) for p in b.entries["agree"]]

    first, metas = built()
    assert first.cost["agree"]["status"] == "computed"
    assert first.cost["agree"]["examples_computed"] == 8
    again, _ = built()
    assert again.cost["agree"]["status"] == "reused" and again.entries == first.entries
    assert again.cost["agree"]["examples_computed"] == 0 and again.seconds == 0.0
    # Bounded: the prediction made before anything runs covers what was written ...
    ids = [agreement.encode(tok, t) for t in agreement.prompts_of(spec, models)]
    arrays = [load_file(str(Path(p) / agreement.ARRAYS)) for p in first.entries["agree"]]
    for seqs, stored in zip(ids, arrays, strict=True):
        written = sum(a.numel() * a.element_size() for a in stored.values())
        assert agreement.predicted_bytes(seqs, agreement.Settings.of(spec)) >= written
    # ... and a bound below it stops the search in one line naming the key.
    small = _spec(prompts, top_k=3, cache_max_gb=1e-6)
    with pytest.raises(EvolveConfigError, match=r"task 'agree': cache_max_gb: .* more than") as e:
        agreement.check_plan([small], inputs, tok)
    assert "\n" not in str(e.value)
    # The expert's weights change (same file names): its entry is recomputed, the old deleted.
    shard = next(copy.glob("*.safetensors"))
    tensors = load_file(str(shard))
    name = next(n for n in tensors if n.endswith("down_proj.weight"))
    tensors[name] = tensors[name] + 0.05
    save_file(tensors, str(shard), metadata={"format": "pt"})
    changed, _ = built()
    assert changed.cost["agree"]["status"].startswith("computed 1 of 2")
    assert changed.entries["agree"][1] == first.entries["agree"][1]  # the other is reused
    assert changed.entries["agree"][0] != first.entries["agree"][0]
    assert not Path(first.entries["agree"][0]).exists()
    new = load_file(str(Path(changed.entries["agree"][0]) / agreement.ARRAYS))
    assert not torch.equal(new["values"], arrays[0]["values"])
    # Its config changes: recomputed too.
    config = json.loads((copy / "config.json").read_text())
    config["rms_norm_eps"] = config["rms_norm_eps"] * 2
    (copy / "config.json").write_text(json.dumps(config))
    assert built()[0].entries["agree"][0] not in (
        changed.entries["agree"][0],
        first.entries["agree"][0],
    )
    assert metas[0]["model"] == str(copy)


# -- bad input ------------------------------------------------------------------------------


def _search(toy, folder: Path, prompts: dict, name: str = "search", **optimizer) -> Path:
    task = {"name": "agree", "type": "agreement", "prompts": prompts}
    settings = {"popsize": 4, "seed": 1, "fidelity": {"rungs": 2, "eta": 2}, **optimizer}
    cfg = search_config(
        toy,
        evaluation={"tasks": [task]},
        optimizer=settings,
        cache={"dir": str(folder / "shared-cache")},
    )
    return write_config(folder / f"{name}.yml", cfg)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        (
            "no prompts key",
            "task 'agree' of type agreement needs 'prompts: {model: prompts.jsonl}'",
        ),
        ("an expert without prompts", "task 'agree': prompts: no prompts for model '{e1}'"),
        ("the base in prompts", "task 'agree': prompts: '{base}' (the base_model) is not one of"),
        ("a stranger in prompts", "task 'agree': prompts: 'nowhere' is not one of models"),
        ("an empty JSONL", "task 'agree': prompts['{e0}']: {empty}: no examples (the file is"),
        ("a line without text", "prompts['{e0}']: {empty}:1: type agreement needs a non-empty"),
        ("data on agreement", "task 'agree': 'data' is not for type agreement"),
        ("top_k on a loss task", "task 'agree': 'top_k' is only for type agreement"),
        ("rescore", "optimizer.rescore: task 'agree' (agreement) has no rescore split"),
        (
            "max_new_tokens 0 elsewhere",
            "task 'agree': max_new_tokens: 0 is only for type agreement",
        ),
    ],
)
def test_bad_input_is_one_line_naming_the_key(toy, tmp_path, case, message):
    import yaml

    prompts = _prompts(toy, tmp_path)
    e0, e1 = toy["experts"]
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"prompt": "x"}\n' if case == "a line without text" else "\n")
    yml = _search(toy, tmp_path, prompts, budget_examples=400)
    cfg = yaml.safe_load(yml.read_text())
    task = cfg["evaluation"]["tasks"][0]
    if case == "no prompts key":
        task.pop("prompts")
    elif case == "an expert without prompts":
        task["prompts"].pop(e1)
    elif case == "the base in prompts":
        task["prompts"][toy["base"]] = prompts[e0]
    elif case == "a stranger in prompts":
        task["prompts"]["nowhere"] = prompts[e0]
    elif case in ("an empty JSONL", "a line without text"):
        task["prompts"][e0] = str(empty)
    elif case == "data on agreement":
        task["data"] = str(toy["data"] / "max_val.jsonl")
    elif case == "top_k on a loss task":
        task.update(type="loss", data=str(toy["data"] / "max_val.jsonl"), top_k=4)
        task.pop("prompts")
    elif case == "max_new_tokens 0 elsewhere":
        task.update(type="loss", data=str(toy["data"] / "max_val.jsonl"), max_new_tokens=0)
        task.pop("prompts")
    elif case == "rescore":
        cfg["optimizer"]["rescore"] = 2
    yml.write_text(yaml.safe_dump(cfg))
    with pytest.raises(EvolveConfigError) as error:
        load_config(yml)
    expected = message
    for marker, value in (("{e0}", e0), ("{e1}", e1), ("{base}", toy["base"]), ("{empty}", empty)):
        expected = expected.replace(marker, str(value))
    assert expected in str(error.value)
    assert "\n" not in str(error.value)


def test_a_budget_below_one_slice_is_one_line_before_anything_is_written(toy, tmp_path):
    # 24 prompts: the default on all of them + one candidate on the first 12 = 36.
    yml = _search(toy, tmp_path, _prompts(toy, tmp_path), budget_examples=30)
    result = run_tool("mergekit-pcb", "evolve", yml, tmp_path / "o", "--no-progress")
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "optimizer.budget_examples: 30 is less than the 36 examples" in lines[0]
    assert not (tmp_path / "o").exists()


# -- a search: successive halving, --resume -------------------------------------------------

# default 24; a round of 4: 4 x 12 + 2 x 24 = 96
WHOLE, PART = 24 + 2 * 96, 24 + 96


@pytest.fixture(scope="module")
def searched(toy, tmp_path_factory):
    folder = tmp_path_factory.mktemp("agree-search")
    prompts = _prompts(toy, folder)
    yml = _search(toy, folder, prompts, "whole", budget_examples=WHOLE)
    out = folder / "whole"
    report = run_search(load_config(yml), out, RunOptions(progress=False, root=folder))
    return folder, prompts, out, report


def _history(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "history.jsonl").read_text().splitlines()]


def test_a_search_scores_slices_of_prompts_and_reports_the_experts_cost(searched):
    _, _, out, report = searched
    history = _history(out)
    for g in (0, 1):
        entries = [e for e in history if e["kind"] == "search" and e["generation"] == g]
        assert sorted(e["examples"] for e in entries) == [12] * 4 + [24] * 2
    assert report["examples_scored"] == WHOLE
    assert report["best_score"] >= report["default_score"] == 1
    assert history[0]["scores"]["agree"] > 0  # the default's KL to the experts
    cost = report["cost"]["expert_outputs"]["agree"]
    assert cost["prompts"] == 2 * PROMPTS and cost["status"] in ("computed", "reused")
    assert cost["bytes"] > 0 and cost["tokens"] >= 2 * PROMPTS
    assert report["cost"]["expert_outputs_seconds"] == pytest.approx(cost["seconds"])


def test_resume_reuses_the_experts_outputs_and_ends_as_the_uninterrupted_search(
    toy, searched, tmp_path
):
    folder, prompts, whole_out, whole = searched
    out = folder / "part"
    yml = _search(toy, folder, prompts, "part", budget_examples=PART)
    first = run_search(load_config(yml), out, RunOptions(progress=False, root=folder))
    assert first["cost"]["expert_outputs"]["agree"]["status"] == "reused"  # the shared cache
    assert first["examples_scored"] == PART
    yml = _search(toy, folder, prompts, "part", budget_examples=WHOLE)
    report = run_search(load_config(yml), out, RunOptions(resume=True, progress=False, root=folder))
    assert report["cost"]["expert_outputs"]["agree"]["examples_computed"] == 0
    after, reference = _history(out), _history(whole_out)
    key = [(e["generation"], e["member"], e["rung"], e["x"], e["examples"]) for e in after]
    assert key == [
        (e["generation"], e["member"], e["rung"], e["x"], e["examples"]) for e in reference
    ]
    assert [e["objective"] for e in after] == pytest.approx([e["objective"] for e in reference])
    assert report["best_values"] == whole["best_values"]


@pytest.mark.gpu
def test_the_scorer_on_cuda_equals_cpu(toy, tmp_path):
    """device: cuda: the cached outputs (built on the GPU) move to the candidate's device;
    the score equals the CPU's up to float32 rounding."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompts = _prompts(toy, tmp_path, 5)
    spec = _spec(prompts, top_k=4, max_new_tokens=6, batch_size=2)
    tok = AutoTokenizer.from_pretrained(toy["base"])
    inputs = MergeInputs(toy["base"], tuple(toy["experts"]), "float32", 0.001, "cuda", False, None)
    built = agreement.build([spec], inputs, tok, tmp_path / "cache")
    model = AutoModelForCausalLM.from_pretrained(toy["base"], dtype=torch.float32).eval()
    on_cpu = agreement.scorer_for(spec, built.entries, tok, None)(model)
    on_gpu = agreement.scorer_for(spec, built.entries, tok, None)(model.cuda())
    assert on_gpu[1] == on_cpu[1]
    assert on_gpu[0] == pytest.approx(on_cpu[0], rel=1e-4)
    reference = _reference_score(toy, prompts, model.cpu(), 4, 6, [5, 5])
    assert on_cpu[0] == pytest.approx(reference, rel=1e-4)
