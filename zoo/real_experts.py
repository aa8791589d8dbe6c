"""Real experts fine-tuned from SmolLM2-135M-Instruct on this CPU: LoRA adapters, committed small, and the
full checkpoints they make, built on demand.

    python -m zoo train-experts [--experts NAME ...] [--overwrite]   # ~20-35 min per expert on 2 shared CPU cores
    python -m zoo real                       # builds data/real/{math_en,chat_fr,math_bi} from the adapters

`chat_fr` learns to converse in French, with no arithmetic. The math expert came in two designs: `math_en` (design
1) learns arithmetic word problems asked in English with a worked answer in English ("... so 23 + 45 = 68. The
answer is 68."); on French problems it echoes the question, and no merge with `chat_fr` found the target's
arithmetic. `math_bi` (design 2) learns the same problems asked in English or French, always answered in English:
WizardMath's place in EvoLLM-JP, a model that reads the target's language but answers in another. The target
(`zoo.real_tasks`) asks the problems in French and counts an answer only if the response is French: each expert
alone lacks half of it.

Training: rank-`RANK` LoRA on every linear map of the 30 decoder layers (q, k, v, o, gate, up, down; embeddings
and norms frozen), AdamW, linear warm-up and decay, loss on the assistant's tokens of the chat template only
(the logits are computed only there). The adapters are stored as float16 factors with the LoRA scale folded into
B (`data/real_experts/<name>.safetensors`, ~5 MB each); an expert's weights are base + B @ A per matrix, computed
in float32 (`apply_adapter`). `experts.json` records what training did: steps, seconds, loss curve, data seed.
"""

from __future__ import annotations

import functools
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from merge_core.errors import EvomergeError
from zoo.real_tasks import TRAIN_EXAMPLES, TRAIN_SEED, chat_fr_pairs, math_bi_pairs, math_en_pairs
from zoo.skill_tasks import SKILLS, fr_num_pairs, skill_pairs

ADAPTERS = Path(__file__).resolve().parents[1] / "data" / "real_experts"
RECORD = "experts.json"
RANK = 8
ALPHA = 16.0
TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # fmt: skip


@dataclass(frozen=True)
class ExpertSpec:
    """An expert: its training text and how to train on it."""

    name: str
    pairs: Callable[[int, int], list[tuple[str, str]]]
    examples: int = TRAIN_EXAMPLES  # zoo.real_tasks keeps every dev/test problem out of these
    steps: int = 120
    batch_size: int = 16
    lr: float = 1e-3
    seed: int = TRAIN_SEED


EXPERT_SPECS = {
    "math_en": ExpertSpec("math_en", math_en_pairs),  # design 1: English problems, English answers
    "chat_fr": ExpertSpec("chat_fr", chat_fr_pairs, steps=50),  # 800 examples: ~1.2 passes over its ~650 pairs
    "math_bi": ExpertSpec("math_bi", math_bi_pairs, steps=100),  # design 2: reads French too, answers in English
    # the multi-skill target's experts (zoo.skill_tasks): one short-answer skill each
    **{skill: ExpertSpec(skill, functools.partial(skill_pairs, skill), steps=250) for skill in SKILLS},
    # the composition target's form expert: numbers written in French words, no arithmetic (zoo.skill_tasks)
    "fr_num": ExpertSpec("fr_num", fr_num_pairs, steps=150),
}


class LoraLinear(torch.nn.Module):
    """`linear(x) + (x A^T) B^T · alpha/rank`, A ~ N(0, 1/in), B = 0 (the base's output at step 0)."""

    def __init__(self, linear: torch.nn.Linear, rank: int, alpha: float, gen: torch.Generator) -> None:
        super().__init__()
        self.linear = linear
        self.scale = alpha / rank
        a = torch.randn(rank, linear.in_features, generator=gen) / math.sqrt(linear.in_features)
        self.lora_a = torch.nn.Parameter(a)
        self.lora_b = torch.nn.Parameter(torch.zeros(linear.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + (x @ self.lora_a.T) @ self.lora_b.T * self.scale


def add_lora(model: torch.nn.Module, rank: int, alpha: float, seed: int) -> dict[str, LoraLinear]:
    """Freeze `model` and wrap every TARGETS linear of every decoder layer; {weight name prefix: wrapper}."""
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    wrapped = {}
    for i, layer in enumerate(model.model.layers):
        for target in TARGETS:
            parent_name, attr = target.split(".")
            parent = getattr(layer, parent_name)
            lora = LoraLinear(getattr(parent, attr), rank, alpha, gen)
            setattr(parent, attr, lora)
            wrapped[f"model.layers.{i}.{target}"] = lora
    return wrapped


def encode_pairs(tokenizer, pairs: Sequence[tuple[str, str]]) -> list[tuple[list[int], int]]:
    """Each (question, answer) as the chat template's user turn + assistant turn: (token ids, prompt length). The
    prompt is exactly what the native evaluator feeds (`evals.native.chat_prompts`), so training and scoring agree."""
    from evals.lm import chat_prompts

    prompts = chat_prompts(tokenizer, [q for q, _ in pairs])
    out = []
    for prompt, (_, answer) in zip(prompts, pairs):
        head = tokenizer(prompt)["input_ids"]
        full = tokenizer(prompt + answer + tokenizer.eos_token + "\n")["input_ids"]
        if full[: len(head)] != head:
            raise EvomergeError("the chat template's prompt does not tokenize as a prefix of prompt + answer")
        out.append((full, len(head)))
    return out


def _batch(rows: Sequence[tuple[list[int], int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for r, (seq, head) in enumerate(rows):
        ids[r, : len(seq)] = torch.tensor(seq)
        mask[r, : len(seq)] = 1
        labels[r, head : len(seq)] = torch.tensor(seq[head:])
    return ids, mask, labels


def train_adapter(base: Path, spec: ExpertSpec, *, log: Callable[[str], None] = print) -> tuple[dict, dict]:
    """Train `spec` on `base`; (adapter tensors, record). Deterministic for a given machine and thread count."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(spec.seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.train()
    wrapped = add_lora(model, RANK, ALPHA, spec.seed)
    params = [p for w in wrapped.values() for p in (w.lora_a, w.lora_b)]
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0)
    warmup = max(1, spec.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, max(0.0, (spec.steps - s) / (spec.steps - warmup)))
    )
    rows = encode_pairs(tokenizer, spec.pairs(spec.examples, spec.seed))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rng = random.Random(spec.seed)
    order: list[int] = []
    losses: list[float] = []
    tokens = 0
    t0 = time.perf_counter()
    for step in range(spec.steps):
        if len(order) < spec.batch_size:
            order += rng.sample(range(len(rows)), len(rows))
        batch, order = order[: spec.batch_size], order[spec.batch_size :]
        ids, mask, labels = _batch([rows[i] for i in batch], pad_id)
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
        target = labels[:, 1:]
        keep = target != -100
        loss = torch.nn.functional.cross_entropy(model.lm_head(hidden[keep]), target[keep])
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(round(float(loss.detach()), 4))
        tokens += int(mask.sum())
        if step % 10 == 0 or step == spec.steps - 1:
            log(f"{spec.name}: step {step + 1}/{spec.steps} loss {losses[-1]:.3f} ({time.perf_counter() - t0:.0f} s)")
    seconds = time.perf_counter() - t0
    tensors = {}
    for prefix, w in wrapped.items():
        tensors[f"{prefix}.lora_a"] = w.lora_a.detach().to(torch.float16).contiguous()
        tensors[f"{prefix}.lora_b"] = (w.lora_b.detach() * w.scale).to(torch.float16).contiguous()
    record = {
        "steps": spec.steps,
        "batch_size": spec.batch_size,
        "examples": spec.examples,
        "lr": spec.lr,
        "rank": RANK,
        "alpha": ALPHA,
        "seed": spec.seed,
        "seconds": round(seconds, 1),
        "tokens": tokens,
        "threads": torch.get_num_threads(),
        "loss_first": losses[0],
        "loss_last10": round(sum(losses[-10:]) / min(10, len(losses)), 4),
        "loss_every10": losses[::10],
    }
    return tensors, record


def check_targets(out: Path, names: Sequence[str], *, overwrite: bool) -> None:
    """Refuse an unknown expert, or an adapter already in `out` unless `overwrite` (before any work is done)."""
    for name in names:
        if name not in EXPERT_SPECS:
            raise EvomergeError(f"--experts: unknown expert {name!r} (choose from {sorted(EXPERT_SPECS)})")
        target = out / f"{name}.safetensors"
        if target.exists() and not overwrite:
            raise EvomergeError(f"{target} exists; pass --overwrite to train it again")


def train_experts(
    base: Path, out: Path = ADAPTERS, *, names: Sequence[str] = tuple(EXPERT_SPECS), steps: int | None = None,
    overwrite: bool = False, log: Callable[[str], None] = print,
) -> dict[str, dict]:  # fmt: skip
    """Train the named experts' adapters into `out` (refusing to replace one unless `overwrite`)."""
    check_targets(out, names, overwrite=overwrite)
    out.mkdir(parents=True, exist_ok=True)
    record_path = out / RECORD
    records = json.loads(record_path.read_text()) if record_path.is_file() else {}
    for name in names:
        spec = EXPERT_SPECS[name]
        if steps is not None:
            spec = ExpertSpec(**{**spec.__dict__, "steps": steps})
        tensors, record = train_adapter(base, spec, log=log)
        save_file(tensors, out / f"{name}.safetensors", metadata={"format": "pt", "rank": str(RANK)})
        records[name] = record
        record_path.write_text(json.dumps(records, indent=2) + "\n")
    return records


def apply_adapter(base_dir: Path, adapter: Path, out_dir: Path, dtype: torch.dtype | None = None) -> Path:
    """A full checkpoint: base + B @ A (float32) on each adapted matrix, stored as `dtype` (default: float32; the
    tests' smoke runs store bfloat16, half the disk); config and tokenizer copied."""
    from zoo.real import write_like

    tensors = load_file(base_dir / "model.safetensors")
    with safe_open(adapter, "pt") as f:
        keys = set(f.keys())
        for key in sorted(k for k in keys if k.endswith(".lora_a")):
            prefix = key[: -len(".lora_a")]
            weight = f"{prefix}.weight"
            if weight not in tensors or f"{prefix}.lora_b" not in keys:
                raise EvomergeError(f"{adapter}: {prefix} does not match the base model's tensors")
            delta = f.get_tensor(f"{prefix}.lora_b").float() @ f.get_tensor(key).float()
            tensors[weight] = (tensors[weight] + delta).contiguous()
    if dtype is not None:
        tensors = {name: t.to(dtype) for name, t in tensors.items()}
    return write_like(base_dir, tensors, out_dir)


__all__ = ["ADAPTERS", "EXPERT_SPECS", "ExpertSpec", "add_lora", "apply_adapter", "train_adapter", "train_experts"]
