"""search_spaces: vectors x in R^d <-> MergeRecipe (parameter space, data-flow space, hybrid)."""
