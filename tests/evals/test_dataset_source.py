"""Task data from a `datasets` source: a save_to_disk folder and a hub id served from the local cache offline, run
through the same evaluator path as JSONL on the tiny zoo model."""

from __future__ import annotations

import glob
import shutil
from pathlib import Path

import datasets
import huggingface_hub.constants
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from evals.data import DatasetNotCached, dataset_rows, read_jsonl, write_jsonl
from evals.native import GenerationEvaluator
from merge_core.errors import EvomergeError

ROOT = Path(__file__).resolve().parents[2]
ZOO_TASK = ROOT / "data" / "zoo" / "tasks" / "ja_sub"
HUB_ID = "SakanaAI/gsm8k-ja-test_250-1319"
FIELDS = {"prompt": "question", "answer": "answer_number"}
TASK = dict(max_new_tokens=2, stop=["</s>"], extract="first_word", batch_size=16, gold_prob=True)


def jp_math_rows(n: int = 40) -> list[dict[str, str]]:
    """The zoo's ja_sub test items in the jp_math dataset's schema (question, answer_number)."""
    return [{"question": r["prompt"], "answer_number": r["answer"]} for r in read_jsonl(ZOO_TASK / "test.jsonl")[:n]]


def save_jp_math_dataset(folder: Path, n: int = 40) -> Path:
    """A `Dataset.save_to_disk` folder with the jp_math schema."""
    rows = jp_math_rows(n)
    datasets.Dataset.from_dict({k: [r[k] for r in rows] for k in rows[0]}).save_to_disk(str(folder))
    return folder


def fake_hub_cache(cache: Path, repo_id: str, n: int = 40) -> None:
    """`repo_id`'s test split in a `datasets` cache as load_dataset leaves it after a download (built offline with
    the json builder, then moved to the hub id's cache folder and file names)."""
    jsonl = write_jsonl(cache.parent / "src" / "test.jsonl", jp_math_rows(n))
    datasets.load_dataset("json", data_files={"test": str(jsonl)}, split="test", cache_dir=str(cache / "_json"))
    built = next(p for p in glob.glob(str(cache / "_json" / "json" / "*" / "*" / "*")) if Path(p).is_dir())
    owner, name = repo_id.split("/")
    target = cache / f"{owner}___{name}" / "default" / "0.0.0" / Path(built).name
    shutil.copytree(built, target)
    (target / "json-test.arrow").rename(target / f"{name}-test.arrow")
    shutil.rmtree(cache / "_json")


@pytest.fixture(scope="module")
def zoo_base():
    path = str(ROOT / "data" / "zoo" / "base")
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


@pytest.fixture()
def offline_cache(tmp_path, monkeypatch) -> Path:
    """A tmp `datasets` cache, read as with HF_DATASETS_OFFLINE=1 (no request can leave the process)."""
    cache = tmp_path / "hf_datasets"
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def test_save_to_disk_dataset_scores_as_its_jsonl(tmp_path, zoo_base):
    """Same items, same metrics as the JSONL task with those rows; `slice` and the field map applied."""
    model, tokenizer = zoo_base
    folder = save_jp_math_dataset(tmp_path / "gsm8k_ja")
    source = {"path": str(folder), "fields": FIELDS, "slice": "5:35"}
    from_dataset = GenerationEvaluator(dataset=source, **TASK)
    rows = [{"id": i, "prompt": r["question"], "answer": r["answer_number"]} for i, r in enumerate(jp_math_rows())]
    write_jsonl(tmp_path / "jsonl" / "test.jsonl", rows[5:35])
    from_jsonl = GenerationEvaluator(str(tmp_path / "jsonl"), "test", **TASK)
    assert len(from_dataset.items) == 30 and from_dataset.items[0].id == "5" and from_dataset.name == "gsm8k_ja"
    assert [(i.prompt, i.answer) for i in from_dataset.items] == [(i.prompt, i.answer) for i in from_jsonl.items]
    metrics = from_dataset.evaluate(model, tokenizer)
    assert metrics == from_jsonl.evaluate(model, tokenizer)
    assert set(metrics) == {"acc", "acc_value", "lang_ok", "gold_prob", "gold_logprob"}


def test_hub_id_served_from_the_local_cache_offline(offline_cache, zoo_base):
    fake_hub_cache(offline_cache, HUB_ID)
    model, tokenizer = zoo_base
    evaluator = GenerationEvaluator(dataset={"path": HUB_ID, "split": "test", "fields": FIELDS}, limit=20, **TASK)
    assert len(evaluator.items) == 20 and evaluator.name == "gsm8k-ja-test_250-1319"
    assert 0.0 <= evaluator.evaluate(model, tokenizer)["acc"] <= 1.0
    with pytest.raises(DatasetNotCached):  # not in the cache: refused at once, nothing downloaded
        dataset_rows("generation", {"path": "nobody/not-cached", "split": "test"}, offline=True)
    with pytest.raises(EvomergeError, match="Unknown split"):
        dataset_rows("generation", {"path": HUB_ID, "split": "train", "fields": FIELDS}, offline=True)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ({"fields": {"prompt": "question", "answer": "answer_num"}}, "dataset.fields.answer: column 'answer_num'"),
        ({"fields": FIELDS, "split": "test"}, "dataset.split: .* holds one Dataset, not splits"),
        ({"fields": {"question": "prompt"}}, "dataset.fields.question: not a generation item field"),
        ({"fields": FIELDS, "slice": "a:b"}, "dataset.slice: expected 'start:stop'"),
    ],
)
def test_bad_dataset_sources_name_the_field(tmp_path, source, message):
    folder = save_jp_math_dataset(tmp_path / "d", n=5)
    with pytest.raises(EvomergeError, match=message) as err:
        dataset_rows("generation", {"path": str(folder), **source})
    assert "\n" not in str(err.value)
