"""Issue 24's task files (zoo/skill_tasks.py): the committed dev/test/val items are what the generators write, and no
held-out item is a dev item or a training prompt."""

from __future__ import annotations

import json
from pathlib import Path

from zoo.skill_tasks import SKILLS, TRAIN_EXAMPLES, TRAIN_SEED, skill_pairs, write_fr_sum_tasks, write_skill_tasks

ROOT = Path(__file__).resolve().parents[2]
TASKS = ROOT / "data" / "real_tasks"


def prompts(path: Path) -> list[str]:
    return [json.loads(line)["prompt"] for line in path.read_text().splitlines()]


def test_committed_skill_and_fr_sum_files_are_what_the_generators_write(tmp_path) -> None:
    written = {f"skills/{k}": p for k, p in write_skill_tasks(tmp_path / "skills").items()}
    written |= write_fr_sum_tasks(tmp_path)
    assert len(written) == 3 * len(SKILLS) + 2
    for key, path in written.items():
        assert (TASKS / f"{key}.jsonl").read_bytes() == path.read_bytes(), key


def test_the_splits_share_no_prompt_and_none_is_a_training_prompt() -> None:
    for skill in SKILLS:
        splits = {split: prompts(TASKS / "skills" / skill / f"{split}.jsonl") for split in ("dev", "test", "val")}
        assert [len(v) for v in splits.values()] == [64, 200, 200], skill
        training = {q for q, _ in skill_pairs(skill, TRAIN_EXAMPLES, TRAIN_SEED)}
        seen: set[str] = set()
        for split, items in splits.items():
            assert len(set(items)) == len(items) and not set(items) & seen, (skill, split)
            assert not set(items) & training, (skill, split)
            seen |= set(items)
    dev, test = (set(prompts(TASKS / "fr_sum" / f"{s}.jsonl")) for s in ("dev", "test"))
    assert len(dev) == 64 and len(test) == 200 and not dev & test
