"""evals: evaluators that score a live model: native fast paths and the lm-eval backend."""
