"""The sweep's search space (Hydra grammar -> Optuna distributions -> Hydra overrides) and the sampler, pruner
and direction factories: concrete distributions, exact round trips through Hydra's parser, every error path."""

from __future__ import annotations

import math
from typing import Any

import optuna
import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from lorasweep.errors import UserError
from lorasweep.sweeping.factories import PRUNERS, SAMPLERS, grid_size, make_pruner, make_sampler, parse_directions
from lorasweep.sweeping.space import SearchSpace, check_keys, format_value, parse_search_space

optuna.logging.set_verbosity(optuna.logging.ERROR)
pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning", "ignore::UserWarning")

PARSER = OverridesParser.create()

EXAMPLE = {
    "optimizer.lr": "tag(log, interval(1e-5, 1e-2))",
    "network.dim": "choice(4, 8, 16, 32)",
    "network.alpha_ratio": "interval(0.25, 1.0)",
    "scheduler": "choice(constant, cosine, cosine_with_restarts)",
    "training.max_steps": "range(100, 400, step=100)",
    "seed": "3",
    "data.resolution": "64,128",
}


def one(value: str) -> Any:
    """The distribution of a single param ``x`` written as ``value``."""
    return parse_search_space({"x": value}).distributions["x"]


def error(params: dict[str, Any]) -> UserError:
    with pytest.raises(UserError) as info:
        parse_search_space(params)
    return info.value


def parse_back(override: str) -> tuple[str, Any]:
    parsed = PARSER.parse_override(override)
    assert not parsed.is_sweep_override(), override
    return parsed.get_key_element(), parsed.value()


# --- grammar -> distributions ---------------------------------------------------------------------------------

def test_the_example_space_maps_to_the_expected_distributions() -> None:
    space = parse_search_space(EXAMPLE)
    assert space.distributions == {
        "optimizer.lr": FloatDistribution(1e-5, 1e-2, log=True),
        "network.dim": CategoricalDistribution([4, 8, 16, 32]),
        "network.alpha_ratio": FloatDistribution(0.25, 1.0),
        "scheduler": CategoricalDistribution(["constant", "cosine", "cosine_with_restarts"]),
        "training.max_steps": IntDistribution(100, 300, step=100),
        "data.resolution": CategoricalDistribution([64, 128]),
    }
    assert space.fixed == {"seed": "3"}
    assert space.names() == list(EXAMPLE)


def test_choice_values_keep_their_parsed_types() -> None:
    dist = one("choice(2, 2.5, abc, true, 'quoted, text', \"7\")")
    assert dist.choices == (2, 2.5, "abc", True, "quoted, text", "7")
    assert [type(c) for c in dist.choices] == [int, float, str, bool, str, str]
    # Hydra's choice() refuses null as an argument (a type check in its grammar); the comma list takes it.
    assert one("null, 0.5, off").choices == (None, 0.5, "off")
    assert error({"x": "choice(1, null)"}).where == "hydra.sweeper.params.x"


def test_shuffle_and_sort_are_just_choices() -> None:
    assert one("shuffle(choice(1, 2))") == CategoricalDistribution([1, 2])
    assert one("sort(choice(3, 1, 2))") == CategoricalDistribution([1, 2, 3])


@pytest.mark.parametrize(("value", "expected"), [
    ("range(100, 400, step=100)", IntDistribution(100, 300, step=100)),
    ("range(0, 10, 3)", IntDistribution(0, 9, step=3)),
    ("range(5)", IntDistribution(0, 4)),
    ("range(10, 0, -2)", IntDistribution(2, 10, step=2)),
    ("range(7, 8)", IntDistribution(7, 7)),
    ("tag(log, range(1, 9))", IntDistribution(1, 8, log=True)),
])
def test_int_ranges_become_int_distributions_up_to_the_last_produced_value(value: str, expected: Any) -> None:
    assert one(value) == expected


def test_float_ranges_become_the_categorical_of_hydras_values() -> None:
    dist = one("range(0.5, 2.0, 0.5)")
    assert dist == CategoricalDistribution([0.5, 1.0, 1.5])
    produced = list(PARSER.parse_override("x=range(0.1, 0.5, 0.1)").sweep_iterator())
    assert one("range(0.1, 0.5, 0.1)").choices == tuple(produced)
    assert len(produced) == 4


@pytest.mark.parametrize(("value", "expected"), [
    ("interval(0.25, 1.0)", FloatDistribution(0.25, 1.0)),
    ("interval(1, 10)", FloatDistribution(1.0, 10.0)),  # Hydra casts interval bounds to float
    ("int(interval(1, 10))", IntDistribution(1, 10)),
    ("tag(log, interval(1e-5, 1e-2))", FloatDistribution(1e-5, 1e-2, log=True)),
    ("tag(log, int(interval(1, 100)))", IntDistribution(1, 100, log=True)),
    ("interval(-3, -1.5)", FloatDistribution(-3.0, -1.5)),
])
def test_intervals(value: str, expected: Any) -> None:
    dist = one(value)
    assert dist == expected
    assert type(dist) is type(expected)


def test_fixed_values_are_kept_as_text_and_yaml_scalars_are_written_in_hydra_spelling() -> None:
    space = parse_search_space({"seed": "  3 ", "a": 7, "b": True, "c": None, "d": 0.1, "e": "[1, 2]", "+f": "x y"})
    assert space.distributions == {}
    assert space.fixed == {"seed": "3", "a": "7", "b": "true", "c": "null", "d": "0.1", "e": "[1, 2]", "f": "x y"}
    assert space.overrides({}) == ["seed=3", "a=7", "b=true", "c=null", "d=0.1", "e=[1, 2]", "+f=x y"]


def test_add_and_force_add_prefixes_stay_in_the_override_but_not_in_the_param_name() -> None:
    space = parse_search_space({"+extra.a": "choice(1, 2)", "++extra.b": "interval(0, 1)", "db@backup": "x,y"})
    assert list(space.distributions) == ["extra.a", "extra.b", "db@backup"]
    assert space.override_keys == {"extra.a": "+extra.a", "extra.b": "++extra.b", "db@backup": "db@backup"}
    assert space.overrides({"extra.a": 2, "extra.b": 0.5, "db@backup": "y"}) == \
        ["+extra.a=2", "++extra.b=0.5", "db@backup=y"]


# --- grammar errors --------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("params", "where", "phrase"), [
    ({"optimizer.lr": "choice(1,"}, "hydra.sweeper.params.optimizer.lr", "is not valid Hydra sweep syntax"),
    ({"x": "interval(a, b)"}, "hydra.sweeper.params.x", "is not valid Hydra sweep syntax"),
    ({"x": "range(5, 1)"}, "hydra.sweeper.params.x", "is an empty range"),
    ({"x": "range(0.5, 0.1, 0.1)"}, "hydra.sweeper.params.x", "is an empty range"),
    ({"x": "range(1, 5, 0)"}, "hydra.sweeper.params.x", "produces no values"),
    ({"x": "range(0.0, 1.0, 0.0)"}, "hydra.sweeper.params.x", "produces no values"),
    ({"x": "range(0.0, 1.0, 0.00001)"}, "hydra.sweeper.params.x", "more than 10000 values"),
    ({"x": "interval(1.0, 1.0)"}, "hydra.sweeper.params.x", "low bound is not below its high bound"),
    ({"x": "interval(2, 1)"}, "hydra.sweeper.params.x", "low bound is not below its high bound"),
    ({"x": "interval(0, inf)"}, "hydra.sweeper.params.x", "both bounds must be finite"),
    ({"x": "tag(log, interval(0, 1))"}, "hydra.sweeper.params.x", "needs a low bound > 0"),
    ({"x": "tag(log, interval(-1, 1))"}, "hydra.sweeper.params.x", "needs a low bound > 0"),
    ({"x": "tag(foo, interval(0, 1))"}, "hydra.sweeper.params.x", "unknown tag(s) foo"),
    ({"x": "tag(log, choice(1, 2))"}, "hydra.sweeper.params.x", "tags a choice() with `log`"),
    ({"x": "tag(log, range(0, 10, 2))"}, "hydra.sweeper.params.x", "needs step 1 and values >= 1"),
    ({"x": "tag(log, range(0.1, 1.0, 0.1))"}, "hydra.sweeper.params.x", "tags a float range with `log`"),
    ({"x": "choice([1, 2], [3])"}, "hydra.sweeper.params.x", "can only choose numbers, strings"),
    ({"x": "choice(1, 1.0)"}, "hydra.sweeper.params.x", "lists the equal values 1 and 1.0"),
    ({"x": "choice(1, true)"}, "hydra.sweeper.params.x", "lists the equal values 1 and true"),
    ({"x": "choice(a, 'a')"}, "hydra.sweeper.params.x", "lists the equal values a and a"),
    ({"x": "glob(*)"}, "hydra.sweeper.params.x", "which Optuna cannot search"),
    ({"~x": ""}, "hydra.sweeper.params.~x", "deletes a key"),
    ({"x": "1", "+x": "2"}, "hydra.sweeper.params.+x", "sets `x` a second time"),
    ({"x": [1, 2]}, "hydra.sweeper.params.x", "has a list value"),
])
def test_grammar_errors_name_the_param(params: dict[str, Any], where: str, phrase: str) -> None:
    err = error(params)
    assert err.where == where
    assert phrase in err.problem
    assert "Traceback" not in str(err)


def test_parse_errors_carry_hydras_message_and_a_custom_prefix() -> None:
    with pytest.raises(UserError) as info:
        parse_search_space({"x": "choice("}, key_prefix="sweep.params")
    assert info.value.where == "sweep.params.x"
    assert "no viable alternative" in info.value.problem
    assert "choice(4, 8, 16)" in info.value.hint


# --- trial values -> overrides -------------------------------------------------------------------------------

ROUND_TRIP_VALUES: list[Any] = [
    0, 1, -7, 10**20, 0.0, -0.0, 1.0, 0.1, 1e-5, 3.0e-07, 1e16, 1.7976931348623157e308, 5e-324, 2 / 3, -1.25,
    math.inf, -math.inf, True, False, None,
    "cosine", "cosine_with_restarts", "a/b.c-d", "", " ", "a b", "  padded  ", "x,y", "a=b", "1", "1.5", "1e5",
    "-3", "+5", "true", "False", "TRUE", "null", "NULL", "None", "none", "nan", "NaN", "inf", "-inf", "0x10", "1_000",
    "it's", 'say "hi"', "both ' and \"", "back\\slash", "ends with \\", "\\'", "(paren)", "[1, 2]", "{a: 1}",
    "${foo}", "${foo.bar}x", "choice(1,2)", "interval(0,1)", "range(3)", "été", "tab\there", "new\nline", "#hash",
    "a:b", "@at", "$dollar", "%pct", "*star", "?q", "|pipe", "~tilde", "semi;colon", "back`tick", "\\\\",
]


@pytest.mark.parametrize("value", ROUND_TRIP_VALUES, ids=repr)
def test_format_value_round_trips_through_hydras_parser(value: Any) -> None:
    key, parsed = parse_back(f"x={format_value(value)}")
    assert key == "x"
    assert type(parsed) is type(value)
    assert parsed == value


def test_format_value_round_trips_nan_and_refuses_containers() -> None:
    _, parsed = parse_back(f"x={format_value(math.nan)}")
    assert isinstance(parsed, float)
    assert math.isnan(parsed)
    assert format_value("plain_word") == "plain_word"
    assert format_value("a b") == "'a b'"
    assert format_value(1e-5) == "1e-05"
    with pytest.raises(TypeError):
        format_value([1, 2])


def test_overrides_of_every_choice_parse_back_to_the_chosen_value() -> None:
    strings = [v for v in ROUND_TRIP_VALUES if isinstance(v, str)]
    space = SearchSpace(distributions={"+k": CategoricalDistribution(strings)}, fixed={},
                        override_keys={"+k": "++k"})
    for value in strings:
        (override,) = space.overrides({"+k": value})
        assert parse_back(override) == ("++k", value)


def test_suggested_values_become_overrides_hydra_reads_back() -> None:
    space = parse_search_space({**EXAMPLE, "+flag": "true,false,null", "label": "choice('a b', 'c,d')"})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(10):
        trial = study.ask()
        values = space.suggest(trial)
        assert list(values) == list(space.distributions)
        overrides = space.overrides(values)
        assert [o.split("=", 1)[0] for o in overrides] == [space.override_keys[n] for n in space.names()]
        parsed = dict(parse_back(o) for o in overrides)
        assert parsed.pop("seed") == 3
        assert parsed.pop("+flag") == values.pop("flag")
        assert parsed == values
        for name, value in trial.params.items():
            assert space.distributions[name]._contains(space.distributions[name].to_internal_repr(value))
        study.tell(trial, 0.0)


def test_suggest_works_with_a_fixed_trial() -> None:
    space = parse_search_space({"a": "int(interval(1, 4))", "b": "x,y", "c": "interval(0, 1)"})
    values = space.suggest(optuna.trial.FixedTrial({"a": 2, "b": "y", "c": 0.5}))
    assert values == {"a": 2, "b": "y", "c": 0.5}
    assert space.overrides(values) == ["a=2", "b=y", "c=0.5"]


def test_overrides_refuse_values_that_do_not_match_the_space() -> None:
    space = parse_search_space({"a": "1,2"})
    with pytest.raises(ValueError, match="missing"):
        space.overrides({})
    with pytest.raises(ValueError, match="unknown"):
        space.overrides({"a": 1, "b": 2})


# --- grid ----------------------------------------------------------------------------------------------------

def test_grid_enumerates_choices_and_int_ranges() -> None:
    space = parse_search_space({"a": "choice(x, y)", "b": "range(100, 400, step=100)", "c": "int(interval(1, 3))",
                                "d": "range(10, 0, -4)", "seed": "3"})
    assert space.grid() == {"a": ["x", "y"], "b": [100, 200, 300], "c": [1, 2, 3], "d": [2, 6, 10]}


@pytest.mark.parametrize(("value", "phrase"), [("interval(0, 1)", "continuous interval"),
                                               ("tag(log, int(interval(1, 64)))", "log-scaled int interval")])
def test_grid_refuses_what_it_cannot_enumerate(value: str, phrase: str) -> None:
    with pytest.raises(UserError) as info:
        parse_search_space({"+a.b": value}).grid()
    assert info.value.where == "hydra.sweeper.params.+a.b"
    assert phrase in info.value.problem


# --- check_keys ----------------------------------------------------------------------------------------------

CFG = OmegaConf.create({
    "optimizer": {"lr": 1e-4, "weight_decay": 0.0},
    "network": {"dim": 8, "alpha_ratio": "???"},
    "training": {"max_steps": 100, "batch": "${nope}"},
    "seed": 0,
})
GROUPS = {"scheduler", "model", "optimizer"}


def test_check_keys_accepts_config_keys_groups_missing_values_unresolved_interpolations_and_additions() -> None:
    space = parse_search_space({"optimizer.lr": "interval(0.1, 1)", "network.alpha_ratio": "0.5,1.0",
                                "training.batch": "1,2", "scheduler": "cosine,constant", "model@sub": "a,b",
                                "seed": "3", "+new.key": "1,2", "++other": "7", "optimizer": "adamw,sgd"})
    check_keys(space, CFG, GROUPS)


@pytest.mark.parametrize(("key", "suggestion"), [("optimizer.learning_rate", "optimizer.lr"),
                                                 ("network.dimm", "network.dim"),
                                                 ("schedular", "scheduler"),
                                                 ("optimizer.lr.x", None)])
def test_check_keys_names_an_unknown_key_and_the_closest_existing_one(key: str, suggestion: str | None) -> None:
    with pytest.raises(UserError) as info:
        check_keys(parse_search_space({"seed": "1", key: "1,2"}), CFG, GROUPS)
    assert info.value.where == f"hydra.sweeper.params.{key}"
    assert "is not a key of the config nor a config group" in info.value.problem
    assert f"`+{key}`" in info.value.hint
    if suggestion:
        assert f"Did you mean `{suggestion}`?" in info.value.hint


# --- samplers ------------------------------------------------------------------------------------------------

NUMERIC = {"a": "interval(-2.0, 2.0)", "b": "int(interval(0, 8))", "c": "tag(log, interval(1e-3, 1.0))",
           "seed": "3"}


def toy(space: SearchSpace, n_objectives: int) -> Any:
    def objective(trial: optuna.trial.Trial) -> Any:
        values = space.suggest(trial)
        numbers = [float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else 1.0
                   for v in values.values()]
        first = sum(x * x for x in numbers)
        return first if n_objectives == 1 else (first, sum(abs(x - 1) for x in numbers))

    return objective


def run_study(sampler: optuna.samplers.BaseSampler, space: SearchSpace, n_objectives: int = 1,
              n_trials: int = 6) -> optuna.Study:
    directions = ["minimize"] * n_objectives
    study = optuna.create_study(sampler=sampler, directions=directions)
    study.optimize(toy(space, n_objectives), n_trials=n_trials)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == min(n_trials, len(study.trials))
    for trial in complete:
        assert set(trial.params) == set(space.distributions)
        for name, value in trial.params.items():
            dist = space.distributions[name]
            assert dist._contains(dist.to_internal_repr(value)), (name, value)
        assert parse_back(space.overrides(trial.params)[0])[0] in space.override_keys.values()
    return study


@pytest.mark.parametrize("name", ["tpe", "random", "qmc", "gp"])
def test_samplers_sample_a_mixed_space(name: str) -> None:
    space = parse_search_space({**NUMERIC, "d": "choice(x, y, z)"})
    args = {"n_startup_trials": 2} if name in ("tpe", "gp") else None
    sampler = make_sampler(name, seed=0, space=space, n_objectives=1, args=args)
    run_study(sampler, space, n_trials=4)  # two trials past the startup ones: the model-based path runs


def test_seeded_samplers_repeat_their_trials() -> None:
    space = parse_search_space({**NUMERIC, "d": "choice(x, y, z)"})
    runs = [run_study(make_sampler("tpe", seed=7, space=space, n_objectives=1, args={"n_startup_trials": 2}),
                      space) for _ in range(2)]
    assert [t.params for t in runs[0].trials] == [t.params for t in runs[1].trials]


def test_tpe_is_multivariate_with_a_constant_liar_for_one_objective_and_independent_for_several() -> None:
    space = parse_search_space(NUMERIC)
    single = make_sampler("tpe", seed=0, space=space, n_objectives=1)
    assert isinstance(single, optuna.samplers.TPESampler)
    assert single._multivariate is True
    assert single._constant_liar is True
    multi = make_sampler("tpe", seed=0, space=space, n_objectives=2, args={"n_startup_trials": 2})
    assert multi._multivariate is False
    run_study(multi, space, n_objectives=2)
    overridden = make_sampler("tpe", seed=0, space=space, n_objectives=1, args={"constant_liar": False})
    assert overridden._constant_liar is False


def test_grid_sampler_visits_every_combination_once() -> None:
    space = parse_search_space({"a": "choice(x, y)", "b": "range(1, 4)", "seed": "3"})
    sampler = make_sampler("grid", seed=0, space=space, n_objectives=1)
    assert grid_size(space) == 6  # the sweep controller stops there (the sampler itself does not stop a study)
    study = run_study(sampler, space, n_trials=6)
    assert len(study.trials) == 6
    assert sorted((t.params["a"], t.params["b"]) for t in study.trials) == \
        [(a, b) for a in ("x", "y") for b in (1, 2, 3)]


def test_grid_sampler_refuses_an_interval() -> None:
    space = parse_search_space({"a": "interval(0, 1)"})
    with pytest.raises(UserError) as info:
        make_sampler("grid", seed=0, space=space, n_objectives=1)
    assert info.value.where == "hydra.sweeper.params.a"


def test_cmaes_samples_numeric_params_and_refuses_choices_and_several_objectives() -> None:
    space = parse_search_space(NUMERIC)
    run_study(make_sampler("cmaes", seed=0, space=space, n_objectives=1), space)
    with pytest.raises(UserError) as info:
        make_sampler("cmaes", seed=0, space=parse_search_space({**NUMERIC, "+d": "x,y"}), n_objectives=1)
    assert info.value.where == "hydra.sweeper.sampler"
    assert "`+d` is a choice" in info.value.problem
    assert "tpe" in info.value.hint
    with pytest.raises(UserError) as info:
        make_sampler("cmaes", seed=0, space=space, n_objectives=2)
    assert info.value.where == "hydra.sweeper.sampler"
    assert "single objective" in info.value.problem


@pytest.mark.parametrize("name", ["tpe", "random", "qmc", "gp"])
def test_samplers_handle_several_objectives(name: str) -> None:
    space = parse_search_space(NUMERIC)
    args = {"n_startup_trials": 2} if name in ("tpe", "gp") else None
    run_study(make_sampler(name, seed=0, space=space, n_objectives=2, args=args), space, n_objectives=2, n_trials=4)


def test_every_sampler_name_builds_and_samples_an_int_space() -> None:
    space = parse_search_space({"a": "range(0, 4)", "b": "int(interval(0, 3))"})
    samplers = [make_sampler(name, seed=None, space=space, n_objectives=1) for name in SAMPLERS]
    classes = [optuna.samplers.TPESampler, optuna.samplers.RandomSampler, optuna.samplers.GridSampler,
               optuna.samplers.CmaEsSampler, optuna.samplers.QMCSampler, optuna.samplers.GPSampler]
    assert all(isinstance(s, cls) for s, cls in zip(samplers, classes, strict=True)), samplers
    for sampler in samplers:
        run_study(sampler, space, n_trials=3)


@pytest.mark.parametrize(("name", "args", "where", "phrase"), [
    ("tpee", None, "hydra.sweeper.sampler", "'tpee' is not a known sampler"),
    ("nsga2", None, "hydra.sweeper.sampler", "is not a known sampler"),
    ("tpe", {"n_startup": 3}, "hydra.sweeper.sampler_args", "unknown keyword(s) n_startup"),
    ("random", {"n_startup_trials": 3}, "hydra.sweeper.sampler_args", "unknown keyword(s) n_startup_trials"),
    ("tpe", {"seed": 3}, "hydra.sweeper.sampler_args", "sets `seed`"),
    ("grid", {"search_space": {}}, "hydra.sweeper.sampler_args", "sets `search_space`"),
    ("qmc", {"qmc_type": "nope"}, "hydra.sweeper.sampler_args", "is not accepted by the qmc QMCSampler"),
    ("tpe", ["n_startup_trials"], "hydra.sweeper.sampler_args", "not a mapping"),
])
def test_sampler_errors(name: str, args: Any, where: str, phrase: str) -> None:
    space = parse_search_space({"a": "choice(1, 2)"})
    with pytest.raises(UserError) as info:
        make_sampler(name, seed=0, space=space, n_objectives=1, args=args)
    assert info.value.where == where
    assert phrase in info.value.problem


def test_sampler_error_hints_list_the_valid_names_and_keywords() -> None:
    space = parse_search_space({"a": "choice(1, 2)"})
    with pytest.raises(UserError) as info:
        make_sampler("TPEE", seed=0, space=space, n_objectives=1)
    assert info.value.hint == "Did you mean `tpe`? Valid samplers: tpe, random, grid, cmaes, qmc, gp."
    with pytest.raises(UserError) as info:
        make_sampler("tpe", seed=0, space=space, n_objectives=1, args={"n_startup": 3})
    assert "Did you mean `n_startup_trials`?" in info.value.hint
    assert "n_ei_candidates" in info.value.hint
    assert "seed" not in info.value.hint.split("Accepted: ")[1].split(", ")
    with pytest.raises(UserError) as info:
        make_sampler("random", seed=0, space=space, n_objectives=1, args={"x": 1})
    assert info.value.hint.endswith("Accepted: none.")


def test_sampler_names_are_case_and_dash_insensitive_and_accept_omegaconf_args() -> None:
    space = parse_search_space({"a": "interval(0, 1)", "b": "interval(0, 1)"})
    sampler = make_sampler(" CmaEs ", seed=0, space=space, n_objectives=1,
                           args=OmegaConf.create({"x0": {"a": 0.5, "b": 0.5}, "sigma0": 0.1}))
    assert isinstance(sampler, optuna.samplers.CmaEsSampler)
    assert sampler._x0 == {"a": 0.5, "b": 0.5}
    assert type(sampler._x0) is dict


# --- pruners -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "cls"), [
    ("none", optuna.pruners.NopPruner), ("median", optuna.pruners.MedianPruner),
    ("percentile", optuna.pruners.PercentilePruner), ("successive_halving", optuna.pruners.SuccessiveHalvingPruner),
    ("hyperband", optuna.pruners.HyperbandPruner), ("Successive-Halving", optuna.pruners.SuccessiveHalvingPruner),
])
def test_pruners_build_with_defaults(name: str, cls: type) -> None:
    assert type(make_pruner(name)) is cls
    assert type(make_pruner(name, {})) is cls


def test_pruner_defaults_and_args() -> None:
    assert make_pruner("percentile")._percentile == 25.0
    median = make_pruner("median", {"n_startup_trials": 2, "n_warmup_steps": 10})
    assert (median._n_startup_trials, median._n_warmup_steps) == (2, 10)
    percentile = make_pruner("percentile", OmegaConf.create({"percentile": 40.0, "interval_steps": 5}))
    assert (percentile._percentile, percentile._interval_steps) == (40.0, 5)
    halving = make_pruner("successive_halving", {"min_resource": 2, "reduction_factor": 3})
    assert (halving._min_resource, halving._reduction_factor) == (2, 3)
    hyperband = make_pruner("hyperband", {"min_resource": 10, "max_resource": 400, "reduction_factor": 2})
    assert (hyperband._min_resource, hyperband._max_resource, hyperband._reduction_factor) == (10, 400, 2)
    assert make_pruner("hyperband")._max_resource == "auto"
    assert set(PRUNERS) == {"none", "median", "percentile", "successive_halving", "hyperband"}


def test_a_pruner_prunes_a_bad_trial() -> None:
    study = optuna.create_study(pruner=make_pruner("median", {"n_startup_trials": 1}))
    for value in (1.0, 5.0):
        trial = study.ask()
        trial.report(value, step=0)
        if trial.should_prune():
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        else:
            study.tell(trial, value)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED]


@pytest.mark.parametrize(("name", "args", "n_objectives", "where", "phrase"), [
    ("medain", None, 1, "hydra.sweeper.pruner", "'medain' is not a known pruner"),
    ("median", {"warmup": 3}, 1, "hydra.sweeper.pruner_args", "unknown keyword(s) warmup for the median pruner"),
    ("none", {"n_startup_trials": 3}, 1, "hydra.sweeper.pruner_args", "unknown keyword(s) n_startup_trials"),
    ("percentile", {"percentile": 150.0}, 1, "hydra.sweeper.pruner_args", "is not accepted by the percentile"),
    ("hyperband", {"max_resource": "x"}, 1, "hydra.sweeper.pruner_args", "is not accepted by the hyperband"),
    ("successive_halving", {"reduction_factor": 1}, 1, "hydra.sweeper.pruner_args", "reduction_factor >= 2"),
    ("median", None, 2, "hydra.sweeper.pruner", "cannot prune a study with 2 objectives"),
])
def test_pruner_errors(name: str, args: Any, n_objectives: int, where: str, phrase: str) -> None:
    with pytest.raises(UserError) as info:
        make_pruner(name, args, n_objectives=n_objectives)
    assert info.value.where == where
    assert phrase in info.value.problem


def test_pruner_error_hints() -> None:
    with pytest.raises(UserError) as info:
        make_pruner("medain")
    assert info.value.hint == ("Did you mean `median`? "
                               "Valid pruners: none, median, percentile, successive_halving, hyperband.")
    with pytest.raises(UserError) as info:
        make_pruner("median", {"warmup": 3})
    assert info.value.hint.endswith("Accepted: n_startup_trials, n_warmup_steps, interval_steps, n_min_trials.")
    assert type(make_pruner("none", n_objectives=3)) is optuna.pruners.NopPruner


# --- directions ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("direction", "expected"), [
    ("minimize", ["minimize"]), ("MAX", ["maximize"]), (" min ", ["minimize"]),
    (["minimize", "max"], ["minimize", "maximize"]), (OmegaConf.create(["max", "min"]), ["maximize", "minimize"]),
])
def test_parse_directions(direction: Any, expected: list[str]) -> None:
    assert parse_directions(direction) == expected


@pytest.mark.parametrize(("direction", "phrase"), [("up", "unknown direction 'up'"), ([], "empty list"),
                                                   (["min", "lower"], "unknown direction 'lower'")])
def test_parse_directions_errors(direction: Any, phrase: str) -> None:
    with pytest.raises(UserError) as info:
        parse_directions(direction)
    assert info.value.where == "hydra.sweeper.direction"
    assert phrase in info.value.problem
