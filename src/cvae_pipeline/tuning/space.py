"""tune.yaml: what a search varies, what it optimizes, its budget, sampler and pruner; validated before any trial.

`params.yaml` is the base of every trial. `space` names the dotted keys that vary, each a range (`low`, `high`, an
optional `log: true` or `step`; integers when both ends are) or a list of `choices`; `fixed` names what every trial of
the search sets otherwise (fewer epochs, fewer images), and `make tune-apply` leaves out. A trial's params are checked
by the model that checks params.yaml (`config.parse_params`); so are both ends of every range and every choice, before
the first trial. Problems are one line that names the key: `tune.yaml: space.train.learning_rate: empty range ...`.
"""

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cvae_pipeline import scores
from cvae_pipeline.config import _Loader, parse_params
from cvae_pipeline.errors import ParamsError

DEFAULT_FILE = "tune.yaml"
# What a trial may be scored by, and which way is better; never a test-set figure.
OBJECTIVES = {scores.per_epoch(scores.VALIDATION): "maximize", "train_seconds": "minimize"}
SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "none")
# A trial is one train stage: what it varies is what train reads. data.* would change the validation set that scores
# the trials, so it may only be fixed, for every trial alike.
VARIED_SECTIONS = ("seed", "model", "train")
FIXED_SECTIONS = ("seed", "data", "model", "train")
TOP_KEYS = {"study", "objectives", "trials", "sampler", "pruner", "fixed", "space"}


@dataclass(frozen=True)
class Dimension:
    """One varied key: a range (`low` .. `high`, log-scaled or stepped) or a list of `choices`."""

    key: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple = ()

    def suggest(self, trial) -> Any:
        if self.choices:
            return trial.suggest_categorical(self.key, list(self.choices))
        if isinstance(self.low, int) and isinstance(self.high, int):
            return trial.suggest_int(self.key, self.low, self.high, log=self.log, step=self.step or 1)
        return trial.suggest_float(self.key, float(self.low), float(self.high), log=self.log, step=self.step)

    def values_to_check(self) -> list:
        return list(self.choices) if self.choices else [self.low, self.high]


@dataclass(frozen=True)
class Sampler:
    name: str = "tpe"
    seed: int = 0


@dataclass(frozen=True)
class Pruner:
    name: str = "median"
    startup_trials: int = 5  # trials that run to the end before any is pruned
    warmup_epochs: int = 2   # epochs of every trial before it may be pruned


@dataclass(frozen=True)
class Search:
    study: str
    objectives: tuple[str, ...]
    trials: int
    sampler: Sampler
    pruner: Pruner
    fixed: dict[str, Any] = field(default_factory=dict)
    space: tuple[Dimension, ...] = ()

    @property
    def directions(self) -> list[str]:
        return [OBJECTIVES[name] for name in self.objectives]

    @property
    def pareto(self) -> bool:
        """Two objectives: the study finds a Pareto front of quality against time (of one trial or more), no best."""
        return len(self.objectives) > 1

    @property
    def prunes(self) -> bool:
        """Pruning reads one per-epoch score: none with two objectives (Optuna's `report` refuses them)."""
        return self.pruner.name != "none" and not self.pareto

    def trial_params(self, base: dict, varied: dict[str, Any], where: str):
        """The validated params of a trial: `base` (params.yaml's mapping), then `fixed`, then `varied`."""
        raw = with_values(base, {**self.fixed, **varied})
        return parse_params(yaml.safe_dump(raw, sort_keys=False), where), raw


def with_values(base: dict, values: dict[str, Any]) -> dict:
    """A deep copy of `base` with each dotted key set."""
    raw = copy.deepcopy(base)
    for key, value in values.items():
        *sections, name = key.split(".")
        node = raw
        for section in sections:
            node = node[section]
        node[name] = value
    return raw


def _fail(message: str) -> None:
    raise ParamsError(message)


def _mapping(value: Any, where: str, allowed: set[str] | None = None) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        _fail(f"{where} must be a mapping, got {value!r}")
    unknown = set(value) - allowed if allowed is not None else set()
    if unknown:
        _fail(f"{where}: unknown key {sorted(unknown)[0]} (allowed: {', '.join(sorted(allowed))})")
    return value


def _integer(value: Any, where: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        _fail(f"{where} must be an integer >= {minimum}, got {value!r}")
    return value


def _param_key(key: Any, where: str, flat: dict[str, str], sections: tuple[str, ...]) -> str:
    if not isinstance(key, str) or key not in flat:
        _fail(f"{where}: unknown key {key} (a dotted params.yaml key, e.g. train.learning_rate)")
    if key.split(".")[0] not in sections:
        shown = ", ".join(section if section == "seed" else section + ".*" for section in sections)
        _fail(f"{where}: {key} cannot be set here (allowed: {shown}; data.* may only be fixed: it changes the "
              "validation set that scores the trials)")
    return key


def _dimension(key: str, spec: Any, where: str) -> Dimension:
    spec = _mapping(spec, where, {"low", "high", "log", "step", "choices"})
    if "choices" in spec:
        if set(spec) != {"choices"} or not isinstance(spec["choices"], list) or not spec["choices"]:
            _fail(f"{where} must be either {{choices: [a non-empty list]}} or {{low, high}}, got {spec!r}")
        if any(isinstance(choice, list | dict) for choice in spec["choices"]):
            _fail(f"{where}: choices must be numbers, strings, true, false or null, got {spec['choices']!r}")
        return Dimension(key, choices=tuple(spec["choices"]))
    low, high, log, step = spec.get("low"), spec.get("high"), spec.get("log", False), spec.get("step")
    for name, value in (("low", low), ("high", high), ("step", step)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                                  or not math.isfinite(value)):
            _fail(f"{where}.{name} must be a finite number, got {value!r}")
    if low is None or high is None:
        _fail(f"{where} needs low and high (a range) or choices (a list)")
    if not low < high:
        _fail(f"{where}: empty range: low ({low!r}) must be less than high ({high!r})")
    if not isinstance(log, bool):
        _fail(f"{where}.log must be true or false, got {log!r}")
    if log and (low <= 0 or step is not None):
        _fail(f"{where}: a log range needs low > 0 and no step, got low {low!r}, step {step!r}")
    if step is not None and step <= 0:
        _fail(f"{where}.step must be positive, got {step!r}")
    return Dimension(key, low, high, log, step)


def parse_search(text: str, base: dict, where: str = DEFAULT_FILE) -> Search:
    """Validate tune.yaml's text against params.yaml's mapping `base`; ParamsError naming the first bad key."""
    try:
        raw = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as error:
        _fail(f"{where}: YAML syntax error: {getattr(error, 'problem', None) or error}")
    raw = _mapping(raw, where, TOP_KEYS)
    study = raw.get("study")
    if not isinstance(study, str) or not study.strip() or "/" in study:
        _fail(f"{where}: study must be a non-empty name without '/', got {study!r}")
    objectives = raw.get("objectives", [scores.per_epoch(scores.VALIDATION)])
    objectives = [objectives] if isinstance(objectives, str) else objectives
    if (not isinstance(objectives, list) or not 1 <= len(objectives) <= 2 or len(set(objectives)) < len(objectives)
            or any(name not in OBJECTIVES for name in objectives)):
        _fail(f"{where}: objectives must be one or two of {', '.join(OBJECTIVES)} (never a test-set figure), "
              f"got {objectives!r}")
    sampler = _mapping(raw.get("sampler"), f"{where}: sampler", {"name", "seed"})
    if sampler.get("name", "tpe") not in SAMPLERS:
        _fail(f"{where}: sampler.name must be one of {', '.join(SAMPLERS)}, got {sampler['name']!r}")
    pruner = _mapping(raw.get("pruner"), f"{where}: pruner", {"name", "startup_trials", "warmup_epochs"})
    if pruner.get("name", "median") not in PRUNERS:
        _fail(f"{where}: pruner.name must be one of {', '.join(PRUNERS)}, got {pruner['name']!r}")
    flat = parse_params(yaml.safe_dump(base), "params.yaml").flat()
    fixed = {_param_key(key, f"{where}: fixed", flat, FIXED_SECTIONS): value
             for key, value in _mapping(raw.get("fixed"), f"{where}: fixed").items()}
    space_raw = _mapping(raw.get("space"), f"{where}: space")
    if not space_raw:
        _fail(f"{where}: space names nothing to vary (e.g. train.learning_rate: {{low: 1.0e-3, high: 1.0e-2, "
              "log: true}})")
    space = tuple(_dimension(_param_key(key, f"{where}: space", flat, VARIED_SECTIONS), spec, f"{where}: space.{key}")
                  for key, spec in space_raw.items())
    overlap = set(fixed) & {dimension.key for dimension in space}
    if overlap:
        _fail(f"{where}: {sorted(overlap)[0]} is both fixed and varied")
    search = Search(study, tuple(objectives), _integer(raw.get("trials", 20), f"{where}: trials", 1),
                    Sampler(sampler.get("name", "tpe"), _integer(sampler.get("seed", 0), f"{where}: sampler.seed", 0)),
                    Pruner(pruner.get("name", "median"),
                           _integer(pruner.get("startup_trials", 5), f"{where}: pruner.startup_trials", 0),
                           _integer(pruner.get("warmup_epochs", 2), f"{where}: pruner.warmup_epochs", 0)),
                    fixed, space)
    _check_values(search, base, where)
    return search


def _check_values(search: Search, base: dict, where: str) -> None:
    """Every end of every range and every choice, set alone on the fixed base, must make valid params; and the trials
    must be scored on a validation set."""
    params, _ = search.trial_params(base, {}, f"{where}: fixed (on params.yaml)")
    for dimension in search.space:
        for value in dimension.values_to_check():
            search.trial_params(base, {dimension.key: value}, f"{where}: space.{dimension.key} = {value!r}")
    if params.data.validation_size == 0:
        _fail(f"{where}: the trials need a validation set to be scored on, and data.validation_size is 0; the test "
              "set is never a search's objective")


def load_search(path: str | Path = DEFAULT_FILE, params_path: str | Path = "params.yaml") -> tuple[Search, dict]:
    """tune.yaml and params.yaml, read and validated: the search, and params.yaml's mapping (every trial's base)."""
    params_text = read_text(params_path)
    parse_params(params_text, str(params_path))
    base = yaml.load(params_text, Loader=_Loader)
    return parse_search(read_text(path), base, str(path)), base


def read_text(path: str | Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ParamsError(f"{path}: file not found; run from the repository root or pass its path") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ParamsError(f"{path}: cannot be read ({error})") from None
