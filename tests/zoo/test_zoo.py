"""Tests for the tiny zoo: world formats, deterministic builds, and the committed data/zoo checkpoints and tasks."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from evals.lm_eval_backend import LmEvalEvaluator, build_task_manager
from evals.native import GenerationEvaluator
from evolve.baselines import heldout_evaluators, score_checkpoint
from evolve.config import load_config
from evolve.spaces import build_space
from merge_core.errors import EvomergeError
from merge_core.materialize import Materializer
from zoo import world
from zoo.__main__ import main
from zoo.build import MODELS, SIZES, SPLITS, build_zoo, make_tokenizer, task_splits, train_experts, write_lm_eval_tasks
from zoo.skills import skill_profile
from zoo.world import TASKS, Problem, Recall

ZOO = Path(__file__).resolve().parents[2] / "data" / "zoo"


def tensor_digest(model_dir: Path) -> str:
    """sha256 over every tensor's name and bytes, in name order."""
    h = hashlib.sha256()
    for name, tensor in sorted(load_file(str(model_dir / "model.safetensors")).items()):
        h.update(name.encode())
        h.update(tensor.contiguous().numpy().tobytes())
    return h.hexdigest()


def zoo_digest(out_dir: Path) -> dict[str, str]:
    digests = {m: tensor_digest(out_dir / m) for m in MODELS}
    for path in sorted((out_dir / "tasks").rglob("*.jsonl")):
        digests[str(path.relative_to(out_dir))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


def first_word_accuracy(model_dir: Path, task: str, n: int = 100) -> float:
    """Greedy first-token accuracy on the first `n` test items (one token == one word)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    rows = [json.loads(line) for line in (ZOO / "tasks" / task / "test.jsonl").read_text().splitlines()[:n]]
    correct = 0
    with torch.no_grad():
        for row in rows:
            ids = tokenizer(row["prompt"], return_tensors="pt").input_ids
            next_id = model(ids).logits[0, -1].argmax().item()
            correct += tokenizer.decode([next_id]) == row["answer"]
    return correct / len(rows)


# --- the world's formats ----------------------------------------------------------------------------


def test_cipher_renders_word_by_word_with_j_numerals() -> None:
    words = ["eva", "has", 7, "pens", ".", "how", "many", "pens", "does", "eva", "have", "?", "answer"]
    assert world.render(words, "j", random.Random(0)) == [
        "hana",
        "motsu",
        "j7",
        "enpitsu",
        "。",
        "dono",
        "ikutsu",
        "enpitsu",
        "ga",
        "hana",
        "aru",
        "？",
        "kotae",
    ]
    assert world.render(words, "e", random.Random(0)) == [
        "eva",
        "has",
        "7",
        "pens",
        ".",
        "how",
        "many",
        "pens",
        "does",
        "eva",
        "have",
        "?",
        "answer",
    ]
    assert [world.numeral(n, "j") for n in (0, 9, 18)] == ["j0", "j9", "j18"]
    assert [world.numeral(n, "e") for n in (0, 9, 18)] == ["0", "9", "18"]


def test_cipher_is_a_bijection_onto_disjoint_words() -> None:
    e_words, j_words = set(world.CIPHER), set(world.CIPHER.values())
    assert len(j_words) == len(e_words) and not e_words & j_words
    vocab = world.vocabulary()
    assert len(vocab) == len(set(vocab)) == 2 * len(e_words) + 2 * (world.MAX_NUMBER + 1)


def test_code_switched_text_mixes_languages_word_by_word() -> None:
    words = world.sample_narrative(random.Random(1)) * 5
    mixed = world.render(words, "mix", random.Random(2))
    english, japanese = world.render(words, "e", random.Random(0)), world.render(words, "j", random.Random(0))
    assert all(m in (e, j) for m, e, j in zip(mixed, english, japanese))
    assert any(m == e != j for m, e, j in zip(mixed, english, japanese))
    assert any(m == j != e for m, e, j in zip(mixed, english, japanese))


def test_problem_and_task_examples() -> None:
    sub = Problem("eva", "pens", "sells", 13, 4)
    assert (sub.op, sub.value) == ("sub", 9)
    prompt, answer = TASKS["ja_sub"].example(sub, random.Random(0))
    assert prompt == "hana motsu j13 enpitsu 。 hana uru j4 enpitsu 。 dono ikutsu enpitsu ga hana aru ？ kotae"
    assert answer == "j9"
    prompt, answer = TASKS["en_add"].example(Problem("tom", "cups", "buys", 4, 5), random.Random(0))
    assert prompt == "tom has 4 cups . tom buys 5 cups . how many cups does tom have ? answer" and answer == "9"
    prompt, answer = TASKS["ja_qa"].example(Recall("sam", "hats", 11), random.Random(0))
    assert prompt == "jun motsu j11 boushi 。 dono ikutsu boushi ga jun aru ？ kotae" and answer == "j11"


def test_task_rows_have_the_documented_format_and_distinct_items() -> None:
    splits, reserved = task_splits(0, SIZES["full"])
    assert set(splits) == set(TASKS)
    assert len(reserved) == sum(sum(SIZES["full"].splits_of(t)) for t in TASKS)
    tokenizer = make_tokenizer()
    for name, by_split in splits.items():
        spec = TASKS[name]
        rows = [r for split in SPLITS for r in by_split[split]]
        assert len({r["id"] for r in rows}) == len(rows) == sum(SIZES["full"].splits_of(name))
        for r in rows:
            assert set(r) == {"id", "prompt", "answer"}
            assert r["prompt"].split()[-1] == ("kotae" if spec.lang == "j" else "answer")
            assert r["answer"] in {world.numeral(n, spec.lang) for n in range(world.MAX_NUMBER + 1)}
            assert tokenizer.unk_token_id not in tokenizer(r["prompt"] + " " + r["answer"]).input_ids
    assert task_splits(1, SIZES["ci"])[0]["ja_sub"]["test"] != task_splits(0, SIZES["ci"])[0]["ja_sub"]["test"]


def test_mixtures_keep_each_skill_in_its_model() -> None:
    rng = random.Random(0)
    digits = {world.e_numeral(n) for n in range(world.MAX_NUMBER + 1)}
    sub_verbs = set(world.SUB_VERBS) | {world.CIPHER[v] for v in world.SUB_VERBS}
    cues = {world.E_CUE, world.J_CUE}
    for mixture in (world.base_mixture(frozenset()), world.expert_ja_mixture(frozenset())):
        docs = [mixture.sample(rng) for _ in range(500)]
        assert not any(cues & set(d) and sub_verbs & set(d) for d in docs), "no subtraction problems"
    math_docs = [d for d in (world.expert_math_mixture(frozenset()).sample(rng) for _ in range(500)) if cues & set(d)]
    assert all(d[-1] in digits for d in math_docs), "the math expert always answers in digits"
    assert any(world.J_CUE in d and sub_verbs & set(d) for d in math_docs), "...even when asked with kotae"


def test_training_data_avoids_reserved_items() -> None:
    keep = Problem("eva", "pens", "sells", 13, 4)
    every_sub = {
        Problem(n, o, v, b + d, b)
        for n in world.NAMES
        for o in world.OBJECTS
        for v in world.SUB_VERBS
        for b in range(10)
        for d in range(10)
    }
    sampler = world.qa_sampler("sub", "e", "e", "e", frozenset(every_sub - {keep}))
    assert {" ".join(sampler(random.Random(s))) for s in range(3)} == {
        "eva has 13 pens . eva sells 4 pens . how many pens does eva have ? answer 9"
    }


# --- builds -----------------------------------------------------------------------------------------


def test_ci_build_is_deterministic_in_the_seed(tmp_path: Path) -> None:
    first = zoo_digest(build_zoo(tmp_path / "a", seed=0, size="ci"))
    again = zoo_digest(build_zoo(tmp_path / "b", seed=0, size="ci"))
    other = zoo_digest(build_zoo(tmp_path / "c", seed=1, size="ci"))
    assert first == again
    assert all(first[k] != other[k] for k in first)
    assert "seed 0" in (tmp_path / "a" / "BUILD.md").read_text()


def test_build_refuses_to_overwrite_without_asking(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["build", "--out", str(tmp_path), "--seed", "0", "--size", "ci"]) == 0
    assert "python -m zoo build --out" in (tmp_path / "BUILD.md").read_text()
    with pytest.raises(EvomergeError, match="already holds a zoo"):
        build_zoo(tmp_path, seed=0, size="ci")
    assert main(["build", "--out", str(tmp_path), "--size", "ci"]) == 2
    assert "already holds a zoo" in capsys.readouterr().err
    with pytest.raises(EvomergeError, match="unknown zoo size"):
        build_zoo(tmp_path / "x", size="huge")  # type: ignore[arg-type]


def test_ci_build_loads_and_generates(tmp_path: Path) -> None:
    out = build_zoo(tmp_path, seed=3, size="ci")
    tokenizer = AutoTokenizer.from_pretrained(out / "expert_ja")
    model = AutoModelForCausalLM.from_pretrained(out / "expert_ja")
    row = json.loads((out / "tasks" / "ja_sub" / "test.jsonl").read_text().splitlines()[0])
    ids = tokenizer(row["prompt"], return_tensors="pt").input_ids
    generated = model.generate(ids, max_new_tokens=3)
    assert generated.shape[1] > ids.shape[1]
    assert tokenizer.decode(ids[0]) == row["prompt"]


# --- the committed zoo ------------------------------------------------------------------------------


def test_committed_lm_eval_tasks_are_what_the_build_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ZOO.parent.parent)  # the build was run from the repository root with --out data/zoo
    written = write_lm_eval_tasks(Path("data/zoo"), tmp_path)
    committed = ZOO / "tasks" / "lm_eval"
    assert sorted(p.name for p in written) == sorted(p.name for p in committed.iterdir())
    assert all(p.read_text() == (committed / p.name).read_text() for p in written)
    manager = build_task_manager(["zoo"], "data/zoo/tasks/lm_eval")  # a group of the five tasks, no template task
    assert set(manager.all_tasks) == {"zoo", *(f"zoo_{t}" for t in TASKS)}


def test_committed_zoo_loads_and_has_tasks() -> None:
    manifest = json.loads((ZOO / "tasks" / "tasks.json").read_text())
    assert [t["name"] for t in manifest["tasks"]] == list(TASKS)
    for task in TASKS:
        lines = (ZOO / "tasks" / task / "test.jsonl").read_text().splitlines()
        assert len(lines) >= 300
        assert set(json.loads(lines[0])) == {"id", "prompt", "answer"}
    for name in MODELS:
        model = AutoModelForCausalLM.from_pretrained(ZOO / name)
        tokenizer = AutoTokenizer.from_pretrained(ZOO / name)
        assert model.config.model_type == "llama" and not model.config.tie_word_embeddings
        assert 1.0e6 < model.num_parameters() < 1.2e6
        assert tokenizer.eos_token == world.TERMINATOR and len(tokenizer) == model.config.vocab_size


def test_committed_zoo_sources_have_the_documented_skills() -> None:
    assert first_word_accuracy(ZOO / "expert_ja", "ja_add") >= 0.8
    assert first_word_accuracy(ZOO / "expert_math", "en_sub") >= 0.8
    assert first_word_accuracy(ZOO / "expert_math", "ja_sub") <= 0.05  # right value, wrong (digit) numerals
    for name in MODELS:
        assert first_word_accuracy(ZOO / name, "ja_sub") <= 0.35  # the target is out of every source's reach


def test_builder_experts_have_the_skill_profile_the_composition_needs() -> None:
    """The builder's expert stage, run on the committed base with the committed world's seed and schedules (about a
    minute of CPU): each expert masters its half of the target and neither does the target. A builder change that
    breaks the world's skill profile fails here (the base stage is covered by the slow full-build test)."""
    record = json.loads((ZOO / "zoo.json").read_text())
    plan = SIZES[record["size"]]
    _, reserved = task_splits(record["seed"], plan)
    tokenizer = make_tokenizer()
    base = AutoModelForCausalLM.from_pretrained(ZOO / "base")
    threads = torch.get_num_threads()
    torch.set_num_threads(record["threads"])
    try:
        experts = train_experts(base, tokenizer, record["seed"], plan, reserved)
    finally:
        torch.set_num_threads(threads)
    tasks = ZOO / "tasks"
    grounded = skill_profile(base, tokenizer, tasks, n=200, tasks=("ja_qa", "en_add"))
    assert grounded["ja_qa"]["acc"] >= 0.9 and grounded["en_add"]["acc"] >= 0.9  # the base reads J as E
    math = skill_profile(experts["expert_math"][0], tokenizer, tasks, n=200, tasks=("ja_sub", "en_sub"))
    assert math["en_sub"]["acc"] >= 0.9
    assert math["ja_sub"]["value"] >= 0.9, "the math expert must subtract J-posed problems (in digits)"
    assert math["ja_sub"]["j_form"] <= 0.05 and math["ja_sub"]["acc"] <= 0.05
    ja = skill_profile(experts["expert_ja"][0], tokenizer, tasks, n=200, tasks=("ja_sub", "ja_add"))
    assert ja["ja_add"]["acc"] >= 0.9 and ja["ja_sub"]["j_form"] >= 0.9
    assert ja["ja_sub"]["value"] <= 0.3, "the J expert must not subtract"


@pytest.mark.slow
def test_full_build_reproduces_the_committed_zoo(tmp_path: Path) -> None:
    record = json.loads((ZOO / "zoo.json").read_text())
    out = build_zoo(tmp_path, seed=record["seed"], size=record["size"], threads=record["threads"])
    assert zoo_digest(out) == zoo_digest(ZOO)


README_ROWS = {"base": "base", "source: Japanese expert": "expert_ja", "source: math expert": "expert_math"}


def test_each_source_scores_on_the_held_out_split_what_the_readme_table_says(monkeypatch: pytest.MonkeyPatch) -> None:
    root = ZOO.parent.parent
    monkeypatch.chdir(root)  # the demo config's paths are relative to the repo root, as the README runs it
    table = {}
    for line in (root / "README.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and cells[0] in README_ROWS:
            table[cells[0]] = float(cells[1])
    assert set(table) == set(README_ROWS), "the README demo table lost a source row"
    cfg = load_config("configs/tiny_jp_math.yaml")
    evaluators = heldout_evaluators(cfg)  # the full test split, as the table was measured
    for row, name in README_ROWS.items():
        metrics, _ = score_checkpoint(cfg, str(ZOO / name), device="cpu", evaluators=evaluators)
        assert metrics["ja_sub/acc"] == pytest.approx(table[row], abs=0.01), row


# The seed-0 demo's best trial (README table: 0.704 held-out): a merge that does the target task.
EVOLVED_SEED0 = {
    "embed.ja.weight": 0.103,
    "embed.math.weight": 0.913,
    "L00.ja.weight": 0.209,
    "L00.math.weight": 1.008,
    "L01.ja.weight": 2.014,
    "L01.math.weight": 0.577,
    "L02.ja.weight": 1.032,
    "L02.math.weight": 1.701,
    "L03.ja.weight": 2.193,
    "L03.math.weight": 2.028,
    "head.ja.weight": 1.975,
    "head.math.weight": 0.386,
}


def test_shipped_lm_eval_task_agrees_with_the_native_evaluator_on_the_target(monkeypatch: pytest.MonkeyPatch) -> None:
    root = ZOO.parent.parent
    monkeypatch.chdir(root)  # the shipped YAMLs name their data relative to the repo root, like the configs
    cfg = load_config("configs/tiny_jp_math.yaml")
    space = build_space(cfg)
    evolved = space.decode([EVOLVED_SEED0[n] for n in space.names])
    materializer = Materializer(evolved, device="cpu")
    merged = materializer.new_model()
    materializer.apply(evolved, merged)
    tokenizer = AutoTokenizer.from_pretrained(ZOO / "expert_ja")
    backend = LmEvalEvaluator(
        ["zoo_ja_sub"],
        include_path="data/zoo/tasks/lm_eval",
        batch_size=32,
        metrics={"zoo_ja_sub": "exact_match,first_word"},
    )
    native = GenerationEvaluator(
        "data/zoo/tasks/ja_sub",
        "test",
        batch_size=100,
        max_new_tokens=2,
        stop=[world.TERMINATOR],
        extract="first_word",
        language_check={"type": "pattern", "pattern": r"^j\d+$"},
    )
    n = len(native.items)
    for model in (merged, AutoModelForCausalLM.from_pretrained(ZOO / "expert_ja")):
        native_acc = native.evaluate(model, tokenizer)["acc"]
        assert backend.evaluate(model, tokenizer)["zoo_ja_sub"] == pytest.approx(native_acc, abs=1 / n + 1e-9)
    assert native_acc == pytest.approx(0.08, abs=0.01)  # the Japanese expert, as in the README table
    assert native.evaluate(merged, tokenizer)["acc"] == pytest.approx(0.704, abs=0.01)  # rounded weights: within noise
