"""What the config layer knows of the evaluators without importing them (torch, transformers, lm-eval take
seconds): the task type names and the defaults of the evaluator fields a config may leave out. Each is written here
once; the evaluator classes and `evolve.config`'s task models both read it."""

from __future__ import annotations

GENERATION, CHOICE, PERPLEXITY, LM_EVAL = "generation", "choice", "perplexity", "lm_eval"
TASK_TYPES = (GENERATION, CHOICE, PERPLEXITY, LM_EVAL)  # evals.EVALUATOR_TYPES builds each

BATCH_SIZE = 8
AUTO_BATCH = "auto"  # a generation or choice task's batch_size decided from the worker's memory plan
AUTO_BATCH_CAP = (
    64  # the most sequences an automatic batch holds (on CPU larger batches gain little: bench/generation.py)
)
# how `limit` picks a task's items: a seeded random sample (the default), or the first `limit` in file order
# (lm-eval's `--limit`)
LIMIT_MODES = ("sample", "first")
LIMIT_MODE = "sample"
MAX_NEW_TOKENS = 32
EXTRACT = "last_number"
GOLD_PROB = True
PERPLEXITY_MAX_LENGTH = 512
