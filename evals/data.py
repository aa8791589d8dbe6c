"""Task data: JSONL splits (`<dir>/{train,dev,test}.jsonl`) or a `datasets` dataset, and deterministic subsampling.

Generation items are ``{"id", "prompt", "answer"}`` (the prompt ends where the model must answer);
multiple-choice items are ``{"id", "prompt", "choices": [...], "label": int}``. A dataset source
(`load_dataset_items`) is a Hugging Face hub id or a local `datasets.save_to_disk` folder, with a map from
these item fields to its columns; its rows go through the same item checks as JSONL rows.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from evals.spec import LIMIT_MODE, LIMIT_MODES
from merge_core.errors import EvomergeError

T = TypeVar("T")


@dataclass(frozen=True)
class GenerationItem:
    """A prompt and its gold answer string."""

    id: str
    prompt: str
    answer: str


@dataclass(frozen=True)
class ChoiceItem:
    """A prompt, its candidate continuations and the index of the right one."""

    id: str
    prompt: str
    choices: tuple[str, ...]
    label: int


def split_path(task_dir: str | Path, split: str) -> Path:
    """`<task_dir>/<split>.jsonl`, checked to exist."""
    path = Path(task_dir) / f"{split}.jsonl"
    if not path.is_file():
        raise EvomergeError(f"task data not found: {path} (expected <task_dir>/{{train,dev,test}}.jsonl)")
    return path


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """All JSON objects of a JSONL file (blank lines skipped)."""
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise EvomergeError(f"{path}:{line_no}: not valid JSON ({err.msg})") from err
    return rows


def write_jsonl(path: str | Path, rows: Sequence[dict[str, Any]]) -> Path:
    """Write `rows` as a UTF-8 JSONL file, one object a line (non-ASCII kept as is), creating its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def _require(row: dict[str, Any], fields: Sequence[str], where: str) -> None:
    """The item fields are there and not null (a null would be read as the text 'None' and scored)."""
    missing = [f for f in fields if f not in row]
    if missing:
        raise EvomergeError(f"{where}: missing field(s) {missing} (have {sorted(row)})")
    null = [f for f in fields if row[f] is None]
    if null:
        raise EvomergeError(f"{where}: field(s) {null} are null; give each item a value")


def load_generation_items(task_dir: str | Path, split: str) -> list[GenerationItem]:
    """The generation items of one split."""
    path = split_path(task_dir, split)
    return generation_items(read_jsonl(path), str(path))


def load_choice_items(task_dir: str | Path, split: str) -> list[ChoiceItem]:
    """The multiple-choice items of one split."""
    path = split_path(task_dir, split)
    return choice_items(read_jsonl(path), str(path))


def generation_items(rows: Sequence[dict[str, Any]], where: str) -> list[GenerationItem]:
    """Generation items from rows with the item fields (`id` optional: the row's position)."""
    items = []
    for i, row in enumerate(rows):
        _require(row, ("prompt", "answer"), f"{where} item {i}")
        items.append(GenerationItem(str(row.get("id", i)), str(row["prompt"]), str(row["answer"])))
    return items


def choice_items(rows: Sequence[dict[str, Any]], where: str) -> list[ChoiceItem]:
    """Multiple-choice items from rows with the item fields (`id` optional: the row's position)."""
    items = []
    for i, row in enumerate(rows):
        _require(row, ("prompt", "choices", "label"), f"{where} item {i}")
        choices = tuple(str(c) for c in row["choices"])
        label = int(row["label"])
        if not 0 <= label < len(choices):
            raise EvomergeError(f"{where} item {i}: label {label} out of range for {len(choices)} choices")
        items.append(ChoiceItem(str(row.get("id", i)), str(row["prompt"]), choices, label))
    return items


# ---------------------------------------------------------------- dataset sources

ITEM_FIELDS = {"generation": ("prompt", "answer", "id"), "choice": ("prompt", "choices", "label", "id")}
SAVED_DATASET_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")  # what save_to_disk writes


class DatasetNotCached(EvomergeError):
    """A hub dataset asked for offline that the local `datasets` cache does not hold."""


def is_saved_dataset(path: str | Path) -> bool:
    """A local folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`."""
    p = Path(path).expanduser()
    return p.is_dir() and any((p / f).is_file() for f in SAVED_DATASET_FILES)


def parse_slice(text: str | None) -> slice:
    """ "start:stop" (either side may be left out, negative counts from the end) as a slice; None: everything."""
    if text is None:
        return slice(None)
    m = re.fullmatch(r"\s*(-?\d+)?\s*:\s*(-?\d+)?\s*", text)
    if not m:
        raise EvomergeError(f"dataset.slice: expected 'start:stop' (e.g. '0:869' or '869:'), got {text!r}")
    return slice(*(int(g) if g is not None else None for g in m.groups()))


def slice_positions(text: str | None, n: int, label: str) -> range:
    """The rows a slice selects of `n`: its bounds within the rows (where Python would clip a bound past the end
    silently, a dataset smaller than the config expects is an error) and at least one row selected."""
    if n == 0:
        raise EvomergeError(f"dataset.split: {label} has no rows; choose a split that has some")
    s = parse_slice(text)
    for bound in (s.start, s.stop):
        if bound is not None and not -n <= bound <= n:
            raise EvomergeError(
                f"dataset.slice: '{text}' reaches past the end of {label}, which has {n} rows; keep its bounds "
                f"within -{n}..{n}"
            )
    positions = range(n)[s]
    if not positions:
        raise EvomergeError(f"dataset.slice: '{text}' selects none of the {n} rows of {label}")
    return positions


@contextmanager
def hub_offline() -> Iterator[None]:
    """`datasets` and `huggingface_hub` in offline mode for the block, as HF_DATASETS_OFFLINE=1 would set them:
    a dataset comes from the local cache or not at all (never a download, never a wait on the network)."""
    import datasets.config
    import huggingface_hub.constants

    saved = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = saved


def open_dataset(source: Mapping[str, Any], *, offline: bool = False) -> Any:
    """The `datasets.Dataset` of a source ``{path, name, split, revision}`` (not sliced): `load_from_disk` for a
    save_to_disk folder, else `load_dataset(path, name, split=, revision=)` (cached as `datasets` caches; with
    `offline`, only from that cache: DatasetNotCached otherwise)."""
    import datasets

    path, split = str(source["path"]), source.get("split")
    if is_saved_dataset(path):
        try:
            data = datasets.load_from_disk(str(Path(path).expanduser()))
        except Exception as err:  # noqa: BLE001 - datasets/pyarrow raise many kinds on a damaged folder
            raise EvomergeError(f"dataset.path: {path}: {unreadable_saved_dataset(Path(path), err)}") from None
        if isinstance(data, datasets.DatasetDict):
            if split not in data:
                raise EvomergeError(f"dataset.split: {split!r} is not a split of {path} (splits: {', '.join(data)})")
            data = data[split]
        elif split is not None:
            raise EvomergeError(f"dataset.split: {path} holds one Dataset, not splits; leave split out")
    else:
        if split is None:
            raise EvomergeError(f"dataset.split: required for {path} (a hub id or a load_dataset path)")
        try:
            with hub_offline() if offline else nullcontext():
                data = datasets.load_dataset(path, source.get("name"), split=split, revision=source.get("revision"))
        except (ConnectionError, FileNotFoundError) as err:
            if offline:
                raise DatasetNotCached(f"{path} is not in the local datasets cache") from None
            raise EvomergeError(f"dataset {path}: {type(err).__name__}: {err}"[:300]) from None
        except ValueError as err:  # an unknown split or configuration
            raise EvomergeError(f"dataset {path}: {err}"[:300]) from None
    if not isinstance(data, datasets.Dataset):
        raise EvomergeError(f"dataset {path}: expected one split, got {type(data).__name__}")
    return data


def unreadable_saved_dataset(folder: Path, err: BaseException) -> str:
    """Why `datasets.load_from_disk` could not read a save_to_disk folder, naming the damaged file where one is:
    a JSON file that does not parse, a data file its split lists that is missing, an empty split (datasets writes
    one with no data file and cannot read it back); else the library's own message, in one line."""
    folder = folder.expanduser()
    fix = "write it again with save_to_disk"
    for meta in sorted(folder.rglob("*.json")):
        try:
            state = json.loads(meta.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError, OSError):
            return f"{meta.relative_to(folder)} is not valid JSON (truncated?); {fix}"
        if meta.name != "state.json" or not isinstance(state, dict):
            continue
        files = [f.get("filename") for f in state.get("_data_files") or [] if isinstance(f, dict)]
        if not files:
            which = "it has" if meta.parent == folder else f"its split '{meta.parent.relative_to(folder)}' has"
            return f"{which} no rows, which datasets cannot read back; remove the empty split or give it rows"
        for name in files:
            if isinstance(name, str) and not (meta.parent / name).is_file():
                return f"{(meta.parent / name).relative_to(folder)} is missing; {fix}"
    text = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
    return f"cannot be read ({type(err).__name__}: {text[:200]}; a data file damaged?); {fix}"


def dataset_rows(kind: str, source: Mapping[str, Any], *, offline: bool = False) -> list[dict[str, Any]]:
    """The source's rows (its `slice` of them) as item-field dicts: ``fields`` maps item fields to columns;
    unmapped fields keep their name, and an unmapped `id` is the row's index in the split."""
    data = open_dataset(source, offline=offline)
    fields = {k: v for k, v in (source.get("fields") or {}).items() if v is not None}
    unknown = sorted(set(fields) - set(ITEM_FIELDS[kind]))
    if unknown:
        raise EvomergeError(f"dataset.fields.{unknown[0]}: not a {kind} item field ({', '.join(ITEM_FIELDS[kind])})")
    columns = {f: fields.get(f, f) for f in ITEM_FIELDS[kind] if f in fields or f != "id"}
    for field, column in columns.items():
        if column not in data.column_names:
            raise EvomergeError(
                f"dataset.fields.{field}: column '{column}' is not in {source['path']} "
                f"(columns: {', '.join(data.column_names)})"
            )
    label = f"{source['path']}" + (f" split {source['split']}" if source.get("split") else "")
    positions = slice_positions(source.get("slice"), len(data), label)
    try:
        table = data.select_columns(sorted(set(columns.values()))).select(positions).to_dict()
    except Exception as err:  # noqa: BLE001 - a data file damaged past what load_from_disk reads
        raise EvomergeError(f"dataset.path: {label}: cannot be read ({type(err).__name__}: {err}"[:300] + ")") from None
    for field, column in columns.items():
        null = next((n for n, value in enumerate(table[column]) if value is None), None)
        if null is not None:
            raise EvomergeError(
                f"dataset.fields.{field}: column '{column}' is null in row {positions[null]} of {label} (it would be "
                "scored as the text 'None'); fill it in, or slice the rows without it"
            )
    return [
        {"id": i, **{field: table[column][n] for field, column in columns.items()}} for n, i in enumerate(positions)
    ]


def load_dataset_items(kind: str, source: Mapping[str, Any]) -> list[GenerationItem] | list[ChoiceItem]:
    """The generation or choice items of a dataset source (see `dataset_rows`), checked as JSONL items are."""
    rows = dataset_rows(kind, source)
    return (generation_items if kind == "generation" else choice_items)(rows, f"dataset {source['path']}")


def subsample_indices(n: int, limit: int | None, seed: int, mode: str = LIMIT_MODE) -> list[int]:
    """Sorted indices of `limit` items: with mode "sample", drawn without replacement by `random.Random(seed)`; with
    "first", the first `limit` (lm-eval's `--limit`); all when limit is None or >= n."""
    if mode not in LIMIT_MODES:
        raise EvomergeError(f"limit_mode: {mode!r} is not one of {', '.join(LIMIT_MODES)}")
    if limit is None or limit >= n:
        return list(range(n))
    if limit < 1:
        raise EvomergeError(f"limit must be a positive number of items, got {limit}")
    if mode == "first":
        return list(range(limit))
    return sorted(random.Random(seed).sample(range(n), limit))


def subsample(items: Sequence[T], limit: int | None, seed: int, mode: str = LIMIT_MODE) -> list[T]:
    """The same `limit` items for the same (limit, seed, mode) every time, in their original order."""
    return [items[i] for i in subsample_indices(len(items), limit, seed, mode)]
