"""Data-flow space (DFS): which layers of models A and B run in what order, with per-hop input scales
(Sakana's formulation).

Slots: the M = L_A + L_B layers (A's, then B's) repeated r times, T = M*r. Slot t is on when its indicator
I_t > 0; the hops are the on slots in order, framed by A's first and last layers (added when absent) and cut to
``max_path_length``. The scale of hop t multiplies the previous block's MLP output (the embedding at hop 1):
  * ``matrix``: s_t = W[l_{t-1}, l_t] over the M layers (M^2 parameters, the paper's choice);
  * ``model_pair``: one scale per (previous model, next model) pair (4 parameters) plus the first hop's;
  * ``slot``: one scale per slot (T parameters), used when the slot is on;
  * ``none``: all scales 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from merge_core.errors import EvomergeError
from merge_core.recipe import MODEL_NAMES, DataFlowRecipe, LayerPath

Scales = Literal["matrix", "model_pair", "slot", "none"]
# The slot count T = (L_A + L_B) * repeats bounds the genome (T indicators, and T scales with `slot`); Sakana's
# 2 x 32 layers x 3 repeats is 192. Far beyond this, CMA-ES's T x T covariance alone takes gigabytes. The
# `matrix` scales (M^2 for M = L_A + L_B layers) are bounded at four times that: 2 x 64 layers at most.
MAX_SLOTS = 4096


@dataclass
class DataFlowSpace:
    """DFS genome: T indicators in [-1, 1] then the scale parameters; see the module docstring."""

    model_a: str
    model_b: str
    layers_a: int
    layers_b: int
    repeats: int = 3
    scales: Scales = "matrix"
    max_path_length: int | None = None
    scale_bounds: tuple[float, float] = (0.0, 2.0)
    indicator_x0_on: float = 0.5
    indicator_x0_off: float = -0.5
    _scale_names: list[str] = field(init=False)

    def __post_init__(self) -> None:
        if self.repeats < 1:
            raise EvomergeError("search.dfs.space.repeats: must be at least 1")
        if self.num_slots > MAX_SLOTS:
            raise EvomergeError(
                f"search.dfs.space.repeats: {self.repeats} repeats of {self.num_layers} layers ({self.layers_a} + "
                f"{self.layers_b}) make {self.num_slots} slots; at most {MAX_SLOTS} are supported "
                f"(repeats <= {max(1, MAX_SLOTS // self.num_layers)} here)"
            )
        if self.max_path_length is not None and self.max_path_length < 2:
            raise EvomergeError("search.dfs.space.max_path_length: must be at least 2 (A's first and last layers)")
        if self.scales == "matrix" and self.num_layers**2 > MAX_SLOTS * 4:
            raise EvomergeError(
                f"search.dfs.space.scales: 'matrix' over {self.num_layers} layers is {self.num_layers**2} scale "
                f"parameters (at most {MAX_SLOTS * 4}); use model_pair or slot"
            )
        self._scale_names = self._make_scale_names()

    # ---- layout --------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.layers_a + self.layers_b

    @property
    def num_slots(self) -> int:
        return self.num_layers * self.repeats

    def slot(self, t: int) -> tuple[int, int]:
        """(model, layer) of slot t: A's layers then B's, repeated."""
        i = t % self.num_layers
        return (0, i) if i < self.layers_a else (1, i - self.layers_a)

    def _layer_label(self, i: int) -> str:
        model, layer = (0, i) if i < self.layers_a else (1, i - self.layers_a)
        return f"{MODEL_NAMES[model]}{layer:02d}"

    def _make_scale_names(self) -> list[str]:
        if self.scales == "matrix":
            return [
                f"W.{self._layer_label(i)}.{self._layer_label(j)}"
                for i in range(self.num_layers)
                for j in range(self.num_layers)
            ] + ["scale.first"]
        if self.scales == "model_pair":
            return ["scale.AA", "scale.AB", "scale.BA", "scale.BB", "scale.first"]
        if self.scales == "slot":
            return [
                f"scale.r{t // self.num_layers}.{self._layer_label(t % self.num_layers)}" for t in range(self.num_slots)
            ]
        return []

    # ---- SearchSpace ---------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self.num_slots + len(self._scale_names)

    @property
    def names(self) -> list[str]:
        return [
            f"I.r{t // self.num_layers}.{self._layer_label(t % self.num_layers)}" for t in range(self.num_slots)
        ] + self._scale_names

    @property
    def bounds(self) -> list[tuple[float, float]]:
        return [(-1.0, 1.0)] * self.num_slots + [tuple(self.scale_bounds)] * len(self._scale_names)

    @property
    def x0(self) -> list[float]:
        """A's own layers on in the first repetition (the paper's initialization), all scales 1."""
        ind = [self.indicator_x0_on if t < self.layers_a else self.indicator_x0_off for t in range(self.num_slots)]
        return ind + [min(max(1.0, self.scale_bounds[0]), self.scale_bounds[1])] * len(self._scale_names)

    def decode(self, x: Sequence[float]) -> DataFlowRecipe:
        if len(x) != self.dim:
            raise EvomergeError(f"genome has {len(x)} values, the space has {self.dim}")
        on = [t for t in range(self.num_slots) if x[t] > 0]
        slots = self._frame(on)
        hops = tuple(self.slot(t) if t >= 0 else (0, 0 if t == -1 else self.layers_a - 1) for t in slots)
        params = dict(zip(self._scale_names, x[self.num_slots :]))
        scales = tuple(self._scale(params, slots, hops, k) for k in range(len(hops)))
        return DataFlowRecipe(self.model_a, self.model_b, LayerPath(hops, scales))

    def encode(self, recipe: DataFlowRecipe) -> list[float]:
        """Indicators for the hops matched greedily to slots in order; scales where the parametrization holds them."""
        x = [self.indicator_x0_off] * self.num_slots
        t = 0
        for hop in recipe.path.hops:
            while t < self.num_slots and self.slot(t) != hop:
                t += 1
            if t == self.num_slots:
                break
            x[t] = self.indicator_x0_on
            t += 1
        return x + [1.0] * len(self._scale_names)

    # ---- helpers -------------------------------------------------------------------------------
    def _frame(self, on: list[int]) -> list[int]:
        """Start with A's first layer and end with A's last (virtual slots -1 / -2 when absent); cap the length."""
        slots = list(on)
        if not slots or self.slot(slots[0]) != (0, 0):
            slots.insert(0, -1)
        if len(slots) < 2 or (slots[-1] >= 0 and self.slot(slots[-1]) != (0, self.layers_a - 1)) or slots[-1] == -1:
            slots.append(-2)
        cap = self.max_path_length
        if cap is not None and len(slots) > cap:
            slots = slots[: cap - 1] + [slots[-1]]
        return slots

    def _scale(self, params: dict[str, float], slots: list[int], hops, k: int) -> float:
        if self.scales == "none":
            return 1.0
        if self.scales == "slot":
            t = slots[k]
            return float(params[self._scale_names[t]]) if t >= 0 else 1.0
        if k == 0:
            return float(params["scale.first"])
        (prev_model, prev_layer), (model, layer) = hops[k - 1], hops[k]
        if self.scales == "model_pair":
            return float(params[f"scale.{MODEL_NAMES[prev_model]}{MODEL_NAMES[model]}"])
        i = prev_layer if prev_model == 0 else self.layers_a + prev_layer
        j = layer if model == 0 else self.layers_a + layer
        return float(params[self._scale_names[i * self.num_layers + j]])
