"""Writing a checkpoint: an output directory staged all or nothing (``staged_output``: a temporary sibling renamed
into place, partials of killed writers removed), sharded safetensors (``ShardedWriter``) and the model files beside
them (``copy_model_files``: config with the output dtype, generation config, tokenizer)."""

from __future__ import annotations

import contextlib
import copy
import glob
import json
import logging
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import PretrainedConfig

from merge_core.checkpoint import PICKLE_INDEX, SAFETENSORS_INDEX, SAFETENSORS_SINGLE, TOKENIZER_FILES, Checkpoint
from merge_core.errors import EvomergeError

log = logging.getLogger(__name__)


def check_output_dir(out_dir: str | Path, *, overwrite: bool = False, inputs: Iterable[str | Path] = ()) -> Path:
    """Refuse, in one line, an output directory that is, is inside, or holds an input model (always), or that is not
    empty (unless `overwrite`). Returns it resolved (a symlink's target: the link stays)."""
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise EvomergeError(f"--out {out_dir}: exists and is not a directory")
    for model in inputs:
        path = Path(model).expanduser()
        if not path.exists():
            continue  # a hub id: not a directory here
        path = path.resolve()
        if out == path or path in out.parents:
            raise EvomergeError(
                f"--out {out_dir}: is {'' if out == path else 'inside '}the input model {model}; "
                "write the merge to another directory"
            )
        if out in path.parents:
            raise EvomergeError(f"--out {out_dir}: holds the input model {model}; write the merge to another directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise EvomergeError(f"--out {out_dir}: is not empty; pass --overwrite to replace it, or choose a new directory")
    return out


STALE_PARTIAL_S = 3600  # a partial output this long untouched, whose writer is gone, is garbage


def remove_stale_partials(out: Path, *, min_age_s: float = STALE_PARTIAL_S) -> list[Path]:
    """Remove the temporary siblings (`.NAME.tmp-PID`) that killed writers of `out` left: only when process PID is not
    alive here and nothing in the folder changed for `min_age_s` (another host's writer on a shared disk keeps it
    fresh). A `.NAME.old-PID` (the previous output, mid-replacement when its writer died) is never removed: a
    warning names it."""
    removed = []
    for path in out.parent.glob(f".{glob.escape(out.name)}.*-*"):
        kind, _, pid = path.name[len(out.name) + 2 :].partition("-")
        if kind not in ("tmp", "old") or not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)):
            continue
        if kind == "old":
            log.warning("%s: the previous %s, left by a writer that died replacing it; restore it by hand", path, out)
            continue
        try:
            newest = max([path.stat().st_mtime] + [p.stat().st_mtime for p in path.rglob("*")])
            if time.time() - newest < min_age_s:
                continue
            shutil.rmtree(path)
        except OSError:
            continue
        log.info("removed %s, a partial output of %s left by a killed process (pid %s)", path, out, pid)
        removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


@contextlib.contextmanager
def staged_output(out_dir: str | Path, *, overwrite: bool = False, inputs: Iterable[str | Path] = ()) -> Iterator[Path]:
    """Write a directory all or nothing: yields a new temporary sibling (`.NAME.tmp-PID`) to write into; when the
    block ends it takes `out_dir`'s place (an old `out_dir` is removed only then); if the block fails it is
    removed and `out_dir` is untouched. `check_output_dir` first."""
    out = check_output_dir(out_dir, overwrite=overwrite, inputs=inputs)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        remove_stale_partials(out)
        tmp.mkdir()
    except OSError as e:
        raise EvomergeError(f"--out {out_dir}: cannot write in {out.parent} ({e.strerror or e})") from None
    try:
        yield tmp
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            try:
                tmp.rename(out)
            except BaseException:
                old.rename(out)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class ShardedWriter:
    """Writes tensors as safetensors shards of at most `max_shard_bytes`, buffering one shard at a time.

    Shards are written under temporary names and renamed by `finalize()` once their count is known:
    `model.safetensors` for one shard, else `model-0000i-of-0000N.safetensors` plus the index transformers reads.
    """

    def __init__(self, out_dir: str | Path, max_shard_bytes: int = 5 * 2**30) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._written: list[tuple[Path, list[str]]] = []
        self._total_bytes = 0
        self._seen: set[str] = set()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Buffer `tensor` under `name`; the current shard is flushed first if it would grow past the limit."""
        if name in self._seen:
            raise EvomergeError(f"writer for {self.out_dir}: tensor '{name}' added twice")
        self._seen.add(name)
        size = tensor.numel() * tensor.element_size()
        if self._buffer and self._buffer_bytes + size > self.max_shard_bytes:
            self._flush()
        self._buffer[name] = _standalone_cpu(tensor, self._buffer.values())
        self._buffer_bytes += size
        self._total_bytes += size

    def finalize(self) -> Path:
        """Flush the last shard, give the shards their final names, write the index; returns the file to load."""
        self._flush()
        if not self._written:
            raise EvomergeError(f"writer for {self.out_dir}: no tensors were added")
        _remove_stale_weights(self.out_dir, keep={tmp for tmp, _ in self._written})
        if len(self._written) == 1:
            return self._written[0][0].rename(self.out_dir / SAFETENSORS_SINGLE)
        count = len(self._written)
        weight_map: dict[str, str] = {}
        for i, (tmp, names) in enumerate(self._written, start=1):
            final = f"model-{i:05d}-of-{count:05d}.safetensors"
            tmp.rename(self.out_dir / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self._total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        index_file = self.out_dir / SAFETENSORS_INDEX
        index_file.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        return index_file

    def _flush(self) -> None:
        if not self._buffer:
            return
        tmp = self.out_dir / f".shard-{len(self._written) + 1:05d}.safetensors.tmp"
        save_file(self._buffer, str(tmp), metadata={"format": "pt"})
        self._written.append((tmp, list(self._buffer)))
        self._buffer = {}
        self._buffer_bytes = 0


def _standalone_cpu(tensor: torch.Tensor, buffered: Iterable[torch.Tensor]) -> torch.Tensor:
    """A contiguous CPU tensor that owns its storage (safetensors refuses views and shared storage)."""
    tensor = tensor.detach().to("cpu").contiguous()
    owns_storage = tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
    shared = any(t.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr() for t in buffered)
    return tensor if owns_storage and not shared else tensor.clone()


def _remove_stale_weights(out_dir: Path, keep: set[Path]) -> None:
    """Delete weight files of an earlier export, which transformers might otherwise load instead."""
    stale = [
        *out_dir.glob("model*.safetensors"),
        *out_dir.glob("pytorch_model*.bin"),
        out_dir / SAFETENSORS_INDEX,
        out_dir / PICKLE_INDEX,
    ]
    for file in stale:
        if file.is_file() and file not in keep:
            file.unlink()


def copy_model_files(
    src: Checkpoint, out_dir: str | Path, dtype: torch.dtype, tokenizer_src: Checkpoint | None = None
) -> None:
    """Write config.json (with `dtype`), and copy generation_config.json and tokenizer files from `tokenizer_src` or
    `src` (the generation config names the tokenizer's special tokens; `src`'s when `tokenizer_src` has none)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(src.config)
    _set_config_dtype(config, dtype)
    config.save_pretrained(out)
    _copy_existing(src.path, out, [p.name for p in src.path.glob("*.py")] if src.trust_remote_code else [])
    tokenizer_home = tokenizer_src or src
    if not _copy_existing(tokenizer_home.path, out, ["generation_config.json"]):
        _copy_existing(src.path, out, ["generation_config.json"])
    if not _copy_existing(tokenizer_home.path, out, TOKENIZER_FILES):
        log.warning("model '%s': no tokenizer files to copy; the output has no tokenizer", tokenizer_home.name)


def _set_config_dtype(config: PretrainedConfig, dtype: torch.dtype) -> None:
    """transformers >= 4.56 names the field `dtype`; older versions `torch_dtype`."""
    if "dtype" in config.to_dict():
        config.dtype = dtype
    else:
        config.torch_dtype = dtype


def _copy_existing(src_dir: Path, out_dir: Path, file_names: Iterable[str]) -> list[str]:
    """Copy those of `file_names` that exist in `src_dir`; returns their names."""
    copied = [f for f in file_names if (src_dir / f).is_file()]
    for f in copied:
        if (src_dir / f).resolve() != (out_dir / f).resolve():
            shutil.copyfile(src_dir / f, out_dir / f)
    return copied
