"""The search space of a stage, built from the run config: PS over the sources, or DFS over models A and B."""

from __future__ import annotations

from pathlib import Path

from optuna.distributions import FloatDistribution

from evolve.config import RunConfig
from merge_core.checkpoint import Checkpoint
from merge_core.errors import EvomergeError
from search_spaces.base import SearchSpace
from search_spaces.dfs import DataFlowSpace
from search_spaces.ps import ParameterSpace


def build_space(cfg: RunConfig, stage: str = "ps") -> SearchSpace:
    """The genome of one stage: PS over the sources, or DFS over models A and B."""
    return build_ps_space(cfg) if stage == "ps" else build_dfs_space(cfg)


def resolve_model(cfg: RunConfig, ref: str) -> str:
    """A source alias -> its path; anything else is a path or hub id."""
    aliases = dict(zip(cfg.models.aliases(), (s.path for s in cfg.models.sources)))
    return aliases.get(ref, ref)


def ps_best_dir(cfg: RunConfig) -> Path:
    """Where a hybrid run writes its PS stage's best merge: model A of its DFS stage."""
    return cfg.run_dir / "ps_best"


def dfs_model_a(cfg: RunConfig) -> str:
    """Model A of the DFS stage: as configured, else the PS stage's best merge (hybrid), else the base."""
    assert cfg.search.dfs is not None
    if cfg.search.dfs.space.model_a is not None:
        return resolve_model(cfg, cfg.search.dfs.space.model_a)
    if "ps" in cfg.search.stages:
        return str(ps_best_dir(cfg))
    if cfg.models.base is None:
        raise EvomergeError("search.dfs.space.model_a: required when there is no base model and no ps stage")
    return cfg.models.base


def dfs_shape_source(cfg: RunConfig) -> str:
    """A checkpoint with model A's shape: A itself, or while a hybrid's PS merge is not written yet the base (the PS
    merge has its shape)."""
    a = dfs_model_a(cfg)
    pending = a == str(ps_best_dir(cfg)) and not Path(a).exists()
    return cfg.models.base or cfg.models.sources[0].path if pending else a


def open_checkpoint(cfg: RunConfig, ref: str) -> Checkpoint:
    """A checkpoint opened with the config's `allow_pickle` and `trust_remote_code`."""
    return Checkpoint.open(ref, allow_pickle=cfg.models.allow_pickle, trust_remote_code=cfg.models.trust_remote_code)


def build_dfs_space(cfg: RunConfig) -> DataFlowSpace:
    assert cfg.search.dfs is not None
    d = cfg.search.dfs.space
    b = resolve_model(cfg, d.model_b)
    return DataFlowSpace(
        model_a=dfs_model_a(cfg),
        model_b=b,
        layers_a=open_checkpoint(cfg, dfs_shape_source(cfg)).num_layers,
        layers_b=open_checkpoint(cfg, b).num_layers,
        repeats=d.repeats,
        scales=d.scales,
        max_path_length=d.max_path_length,
        scale_bounds=tuple(d.scale_bounds),
    )


def build_ps_space(cfg: RunConfig) -> ParameterSpace:
    """The PS genome for this config (the number of layers is read from the base checkpoint's config)."""
    m, sp = cfg.models, cfg.search.space
    return ParameterSpace(
        method=sp.method,
        base=m.base,
        sources=[s.path for s in m.sources],
        num_layers=open_checkpoint(cfg, m.base or m.sources[0].path).num_layers,
        aliases=m.aliases(),
        layers_per_group=sp.layers_per_group,
        modules=sp.modules,
        embed_head_groups=sp.embed_head_groups,
        weight_bounds=tuple(sp.weight_bounds),
        density_bounds=tuple(sp.density_bounds),
        weight_x0=sp.x0.get("weight", 0.5),
        density_x0=sp.x0.get("density", 0.5),
        params=dict(sp.params),
        seed=cfg.seed,
        dtype=sp.dtype,
    )


def distributions(space: SearchSpace) -> dict[str, FloatDistribution]:
    """The study's distribution of each coordinate: the space's box."""
    return {n: FloatDistribution(lo, hi) for n, (lo, hi) in zip(space.names, space.bounds)}
