"""merge_core: tensors in, tensors out. Merge methods, recipes, checkpoint IO and in-memory materialization.

Nothing here knows about search or evaluation.
"""

from merge_core.errors import EvomergeError, IncompatibleModelsError

__all__ = ["EvomergeError", "IncompatibleModelsError"]
