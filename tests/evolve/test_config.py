"""Run config validation: each malformed config gives one line naming the YAML path of the field."""

import copy
from pathlib import Path

import pytest
import yaml

from evolve.cli import main
from evolve.config import TASK_TYPES, load_config, parse_config, redact_url
from merge_core.errors import EvomergeError

GOOD = {
    "name": "demo",
    "models": {"base": "zoo/base", "sources": [{"path": "zoo/expert_ja", "alias": "ja"}, "zoo/expert_math"]},
    "search": {
        "space": {"method": "task_arithmetic", "layers_per_group": 1, "weight_bounds": [0, 2.5], "x0": {"weight": 1.0}},
        "budget": {"max_trials": 10},
    },
    "evaluation": {
        "tasks": [
            {"name": "ja_sub", "type": "generation", "task_dir": "zoo/tasks/ja_sub", "split": "dev", "limit": 50}
        ],
        "fitness": [{"metric": "ja_sub/acc"}, {"metric": "ja_sub/gold_prob", "weight": 0.5}],
    },
}


def mutate(path, value):
    d = copy.deepcopy(GOOD)
    *keys, last = path
    node = d
    for k in keys:
        node = node[k]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return d


DELETE = object()

CASES = [
    (("name",), DELETE, "name: required field is missing"),
    (("name",), "my run!", "name: 'my run!' must be letters"),
    (("models", "sources"), [], "models.sources: List should have at least 1 item"),
    (("models", "sources"), ["a/x", "b/x"], "models.sources: aliases ['x', 'x'] collide"),
    (("models", "sources", 0, "alias"), "j a", "models.sources.0.alias: 'j a' must be letters"),
    (("models", "bsae"), "x", "models.bsae: unknown field"),
    (("search", "space", "weight_bounds"), [2, 1], "search.space.weight_bounds: low 2.0 must be below high 1.0"),
    (("search", "space", "density_bounds"), [0, 1], "search.space.density_bounds: need 0 < low < high <= 1"),
    (("search", "space", "x0"), {"weight": 5.0}, "search.space.x0.weight: 5.0 is outside weight_bounds"),
    (
        ("search", "space", "layers_per_group"),
        0,
        "search.space.layers_per_group: Input should be greater than or equal to 1",
    ),
    (("search", "space", "type"), "dfs2", "search.space.type: Input should be 'ps'"),
    (("search", "budget", "max_trials"), 0, "search.budget.max_trials: Input should be greater than or equal to 1"),
    (("search", "optimizer"), {"sampler": "ga"}, "search.optimizer.sampler: Input should be 'cmaes'"),
    (("search", "optimizer"), {"sigma0": -1}, "search.optimizer.sigma0: Input should be greater than 0"),
    (("evaluation", "tasks"), [], "evaluation.tasks: List should have at least 1 item"),
    (("evaluation", "fitness", 0, "metric"), "acc", "evaluation.fitness[0].metric: 'acc' must be '<task>/<metric>'"),
    (("evaluation", "fitness", 1, "direction"), "up", "evaluation.fitness.1.direction: Input should be 'max' or 'min'"),
    (("evaluation", "tasks", 0, "type"), "bleu", "evaluation.tasks.0.type: Input should be"),
    (
        ("evaluation", "heldout_tasks"),
        [{"name": "ja_sub", "task_dir": "x"}],
        "evaluation.tasks: task names must be unique",
    ),
    (
        ("execution",),
        {"backend": "local", "workers": 3},
        "execution.workers: the local backend runs one in-process worker",
    ),
    (("execution",), {"backend": "spark"}, "execution.backend: Input should be 'local' or 'ray'"),
    (("execution",), {"device": "tpu"}, "execution.device: 'tpu' is not auto, cpu, cuda or cuda:N"),
    (("storage",), "redis://u:hunter2@h/0", "storage: 'redis://u:***@h/0' is not an Optuna RDB URL"),
    (("seed",), "zero", "seed: Input should be a valid integer"),
    (("seed",), 2**32, "seed: Input should be less than 4294967296"),
    (("seed",), -1, "seed: Input should be greater than or equal to 0"),
    (("name",), "n" * 300, "name: String should have at most 100 characters"),
    (
        ("search", "space", "weight_bounds"),
        [float("-inf"), float("inf")],
        "search.space.weight_bounds.0: Input should be a finite number",
    ),
    (("search", "space", "x0"), {"weight": float("nan")}, "search.space.x0.weight: Input should be a finite number"),
    (("models", "sources"), ["zoo/base/", "zoo/expert_ja"], "models.sources[0]: 'zoo/base/' is the base model"),
    (
        ("evaluation", "tasks", 0, "stop"),
        [123, None],
        "evaluation.tasks.0.stop[0]: Input should be a valid string, got 123",
    ),
    (("evaluation", "tasks", 0, "limit"), 0, "evaluation.tasks.0.limit: Input should be greater than or equal to 1"),
    (("evaluation", "tasks", 0, "max_tokens"), 3, "evaluation.tasks[0].max_tokens: not a field of generation tasks"),
    (("evaluation", "tasks", 0), {"name": "ja_sub", "type": "perplexity"}, "evaluation.tasks.0.text_file: required"),
    (
        ("evaluation", "tasks", 0, "batch_size"),
        0,
        "evaluation.tasks.0.batch_size: Input should be greater than or equal",
    ),
]


def test_each_task_type_has_an_evaluator():
    from evals import EVALUATOR_TYPES  # torch, transformers

    assert tuple(EVALUATOR_TYPES) == TASK_TYPES


def test_the_good_config_parses():
    cfg = parse_config(GOOD)
    assert cfg.models.aliases() == ["ja", "expert_math"]
    assert cfg.storage_url == f"sqlite:///{Path('runs/demo').resolve()}/study.db"  # the run dir's, by absolute path


def test_run_seed_override_gets_its_own_run_directory():
    from evolve.cli import with_overrides

    cfg = parse_config(GOOD)
    assert with_overrides(cfg) is cfg
    assert with_overrides(cfg, seed=cfg.seed).name == "demo"  # the config's own seed: the same study
    other = with_overrides(cfg, seed=3)
    assert (other.seed, other.name, other.storage_url) == (
        3,
        "demo-seed3",
        f"sqlite:///{Path('runs/demo-seed3').resolve()}/study.db",
    )
    assert other.search == cfg.search and other.evaluation == cfg.evaluation
    named = with_overrides(cfg, seed=3, name="mine")
    assert (named.seed, named.name) == (3, "mine")
    with pytest.raises(EvomergeError, match="name"):
        with_overrides(cfg, name="bad name!")


@pytest.mark.parametrize(
    "path, value, message", CASES, ids=[".".join(map(str, c[0])) + f"={c[1]!r}"[:30] for c in CASES]
)
def test_malformed_config_gives_one_line_naming_the_field(path, value, message):
    with pytest.raises(EvomergeError) as e:
        parse_config(mutate(path, value))
    text = str(e.value)
    assert message in text and "\n" not in text, text
    assert "hunter2" not in text


def test_passwords_are_redacted():
    assert redact_url("postgresql://evo:s3cret@db.example:5432/evo") == "postgresql://evo:***@db.example:5432/evo"
    assert redact_url("sqlite:///runs/x/study.db") == "sqlite:///runs/x/study.db"


def test_check_command_reports_yaml_errors_in_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(mutate(("search", "space", "weight_bounds"), [3, 1])))
    assert main(["check", str(bad), "--offline"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "search.space.weight_bounds" in err and str(bad) in err
    (tmp_path / "broken.yaml").write_text("name: [unclosed")
    assert main(["check", str(tmp_path / "broken.yaml"), "--offline"]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    assert main(["check", str(tmp_path / "missing.yaml"), "--offline"]) == 2
    assert "config file not found" in capsys.readouterr().err
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(GOOD))
    assert load_config(good).name == "demo"


def test_shipped_configs_pass_offline_check(capsys):
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    for name in (
        "jp_math.yaml",
        "jp_math_hybrid.yaml",
        "tiny_jp_math.yaml",
        "tiny_jp_math_dfs.yaml",
        "tiny_jp_math_hybrid.yaml",
    ):
        assert main(["check", str(root / "configs" / name), "--offline"]) == 0
        assert "config OK" in capsys.readouterr().out


def test_check_names_a_misspelled_task_field(tmp_path, capsys):
    d = copy.deepcopy(GOOD)
    d["evaluation"]["tasks"][0]["max_new_tokns"] = 3
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(d))
    assert main(["check", str(tmp_path / "c.yaml"), "--offline"]) == 2
    assert "evaluation.tasks[0].max_new_tokns: not a field of generation tasks" in capsys.readouterr().err


def test_racing_rescore_and_max_items_fields() -> None:
    data = yaml.safe_load((Path(__file__).parents[2] / "configs" / "tiny_jp_math.yaml").read_text())
    data["evaluation"]["racing"] = {"chunk": 20}
    data["evaluation"]["rescore"] = {"top_k": 3, "split": "train"}
    data["search"]["budget"]["max_items"] = 5000
    cfg = parse_config(copy.deepcopy(data))
    assert (cfg.evaluation.racing.chunk, cfg.evaluation.racing.alpha, cfg.evaluation.racing.test) == (20, 0.05, "t")
    assert (cfg.evaluation.rescore.top_k, cfg.evaluation.rescore.limit) == (3, None)
    assert cfg.search.budget.max_items == 5000 and parse_config(yaml.safe_load(yaml.safe_dump(data))) == cfg
    data["evaluation"]["tasks"].append({"name": "ppl", "type": "perplexity", "text_file": "x.txt"})
    with pytest.raises(EvomergeError) as err:
        parse_config(data)
    assert str(err.value) == (
        "config: evaluation.racing: task 'ppl' is perplexity, which racing cannot score item by item against the "
        "incumbent; racing needs generation and choice tasks (or remove racing)"
    )
    data["evaluation"]["tasks"].pop()
    data["evaluation"]["racing"] = {"alpha": 1.5}
    with pytest.raises(EvomergeError, match=r"^config: evaluation.racing.alpha: Input should be less than 1$"):
        parse_config(data)


def test_execution_threads_sets_torch_threads_where_models_are_built(tmp_path):
    import torch

    from evolve.backends import use_threads

    with pytest.raises(EvomergeError, match="execution.threads: Input should be greater than or equal to 1"):
        parse_config({**GOOD, "execution": {"threads": 0}})
    before = torch.get_num_threads()
    try:
        use_threads(parse_config({**GOOD, "execution": {"threads": 2}}))
        assert torch.get_num_threads() == 2
        use_threads(parse_config(GOOD))  # not set: left as it is
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
