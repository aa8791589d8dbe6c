"""Elite re-scoring: the best trials of a stage scored again on more items (`evaluation.rescore`) or on the
stage protocol's validation items; the run's pick is then the best re-scored trial (`evolve.study.best_trial`)."""

from __future__ import annotations

import logging

import optuna
from optuna.trial import FrozenTrial, TrialState

from evolve.config import RunConfig
from evolve.faults import fault_point
from evolve.fitness import Fitness
from evolve.items import encode_items, items_scored, tokens_generated
from evolve.protocol import use_validation
from evolve.scoring import Scorer, build_evaluators
from evolve.study import RESCORE_KEY, best_first, rescored, storage_errors, trial_recipe

log = logging.getLogger(__name__)


def elites(study: optuna.Study, top_k: int) -> list[FrozenTrial]:
    """The `top_k` best complete trials by search fitness, one per distinct recipe (cached duplicates left out)."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return [t for t in best_first(complete) if "cached_from" not in t.user_attrs][:top_k]


def rescore_elites(cfg: RunConfig, study: optuna.Study, stage: str = "ps") -> dict[int, dict]:
    """Re-score the elites on `evaluation.rescore`'s items (its split and limit, default every item of the task's
    split), or under the stage's protocol on its validation items, and record each one as it finishes (study user
    attr ``rescore:<trial>``: fitness, metrics, per-item record). Elites already recorded are not scored again, so a
    run killed while re-scoring continues where it stopped."""
    rs, protocol = cfg.evaluation.rescore, cfg.search.protocol_of(stage)
    top_k = rs.top_k if rs is not None else protocol.top_k
    done = rescored(study)
    todo = [t for t in elites(study, top_k) if t.number not in done]
    if not todo:
        return done
    if rs is not None:
        evaluators = build_evaluators(
            list(cfg.evaluation.tasks), seed=cfg.seed, split=rs.split, limit=rs.limit, heldout=True
        )
        where = {"split": rs.split, "limit": rs.limit}
    else:
        evaluators = build_evaluators(list(cfg.evaluation.tasks), seed=cfg.seed)
        use_validation(evaluators, protocol.validation, cfg.search.protocol_path(stage))
        where = {"validation": protocol.validation}
    fitness = Fitness(cfg.evaluation.fitness)
    log.info(
        "re-scoring %d elite trials on %s: %s",
        len(todo),
        "more items" if rs is not None else "the validation items",
        [t.number for t in todo],
    )
    scorer = Scorer.for_recipes(cfg, trial_recipe(todo[0]), evaluators)  # the sources resident once
    totals = scorer.totals()
    with storage_errors(cfg):
        for t in todo:  # one at a time, each recorded at once
            scorer.apply(trial_recipe(t))
            metrics, scores = scorer.score()
            items = encode_items(scores, totals)
            done[t.number] = {
                "fitness": fitness.score(metrics),
                "metrics": metrics,
                "items": items,
                "items_scored": items_scored(items),
                "tokens": tokens_generated(items),
                **where,
            }
            study.set_user_attr(f"{RESCORE_KEY}{t.number}", done[t.number])
            fault_point(f"sigkill-after-rescore:{study.study_name}:{t.number}")
    return done
