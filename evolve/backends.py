"""Live models a worker scores: a Materializer writing parameter-space candidates into one model in place, or models
A and B with a data-flow path swapped per candidate; and a checkpoint loaded as it is."""

from __future__ import annotations

from functools import partial

import torch

from evals.spec import AUTO_BATCH
from evolve.config import RunConfig
from evolve.engines import engine_reserve
from evolve.spaces import open_checkpoint
from merge_core.dataflow import DataFlowModel
from merge_core.errors import EvomergeError
from merge_core.materialize import Materializer
from merge_core.memplan import PROMPT_TOKENS
from merge_core.merge import TORCH_DTYPES, resolve_device
from merge_core.recipe import DataFlowRecipe, MergeRecipe, Recipe


def use_threads(cfg: RunConfig) -> None:
    """`execution.threads` torch CPU threads in this process (unchanged when not set)."""
    if cfg.execution.threads is not None and torch.get_num_threads() != cfg.execution.threads:
        torch.set_num_threads(cfg.execution.threads)


def evaluator_batch(cfg: RunConfig) -> tuple[int, int]:
    """(sequences, tokens each) of the configured task with the largest batch: what the memory plan reserves for
    the evaluator (a generation task: an assumed prompt plus max_new_tokens; perplexity: max_length)."""
    sizes = [
        (
            1 if task.batch_size == AUTO_BATCH else task.batch_size,  # an automatic batch takes what the plan leaves
            getattr(task, "max_length", None) or PROMPT_TOKENS + getattr(task, "max_new_tokens", 0),
        )
        for task in cfg.evaluation.tasks
    ]
    return max(sizes, key=lambda s: s[0] * s[1], default=(0, 0))


def load_live_model(cfg: RunConfig, ref: str):
    """An HF checkpoint loaded with transformers onto the execution device and dtype, in eval mode."""
    from transformers import AutoModelForCausalLM

    use_threads(cfg)
    local = open_checkpoint(cfg, ref).path
    model = AutoModelForCausalLM.from_pretrained(
        str(local), dtype=TORCH_DTYPES[cfg.execution.dtype], trust_remote_code=cfg.models.trust_remote_code
    )
    return model.to(resolve_device(cfg.execution.device)).eval()


class MergeBackend:
    """Parameter-space candidates: a Materializer and one live model written in place per candidate."""

    def __init__(self, cfg: RunConfig, template: MergeRecipe):
        self.materializer = Materializer(
            template,
            device=cfg.execution.device,
            allow_pickle=cfg.models.allow_pickle,
            trust_remote_code=cfg.models.trust_remote_code,
            live_dtype=TORCH_DTYPES[cfg.execution.dtype],
            evaluator_batch=evaluator_batch(cfg),
            engine_reserve=partial(engine_reserve, cfg),
        )
        self.model = self.materializer.new_model(dtype=TORCH_DTYPES[cfg.execution.dtype])
        self.tokenizer_path = str(self.materializer.reference.path)

    def apply(self, recipe: MergeRecipe) -> None:
        self.materializer.apply(recipe, self.model)


class DataFlowBackend:
    """Data-flow candidates: models A and B live (weights shared, never copied), the layer path swapped per
    candidate."""

    def __init__(self, cfg: RunConfig, template: DataFlowRecipe):
        self.model_a = load_live_model(cfg, template.model_a)
        self.model_b = load_live_model(cfg, template.model_b)
        self.model = DataFlowModel(self.model_a, self.model_b, template.path)
        self.tokenizer_path = str(open_checkpoint(cfg, template.model_a).path)
        self.template = template

    def apply(self, recipe: DataFlowRecipe) -> None:
        if (recipe.model_a, recipe.model_b) != (self.template.model_a, self.template.model_b):
            raise EvomergeError("recipe: a data-flow worker applies paths over the models A and B it was built with")
        self.model.set_path(recipe.path)


class CheckpointBackend:
    """One checkpoint loaded as it is (a source, the base, an export): nothing to apply."""

    def __init__(self, cfg: RunConfig, path: str):
        self.model = load_live_model(cfg, path)
        self.tokenizer_path = str(open_checkpoint(cfg, path).path)

    def apply(self, recipe: Recipe) -> None:
        raise EvomergeError("a checkpoint scorer scores its checkpoint; it applies no recipe")


Backend = MergeBackend | DataFlowBackend | CheckpointBackend


def make_backend(cfg: RunConfig, template: Recipe) -> MergeBackend | DataFlowBackend:
    """The backend for candidates like `template` (its sources, or its models A and B, resident once)."""
    use_threads(cfg)
    return DataFlowBackend(cfg, template) if isinstance(template, DataFlowRecipe) else MergeBackend(cfg, template)
