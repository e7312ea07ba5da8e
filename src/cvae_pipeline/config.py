"""Typed, validated view of params.yaml: one frozen dataclass per section, loaded once and passed down.

Every field carries a `Rule` (what values are allowed, said in words). `load_params` checks the whole file
before any stage does work, and reports the first problem as one line that names the key path:
`params.yaml: train.batch_size must be a positive integer, got -3`.
"""

import dataclasses
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cvae_pipeline.errors import ParamsError

DEFAULT_PARAMS_FILE = "params.yaml"
KL_MODES = ("analytic", "monte_carlo")
PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")
STRATEGIES = ("auto", "one_device", "mirrored", "multi_worker")
SCHEDULES = ("constant", "cosine")
# Not a param: the tutorial's published test ELBO (2020 edition, 100 epochs), the quality a recipe is timed to reach.
TUTORIAL_ELBO = -78.3


@dataclass(frozen=True)
class Rule:
    """A check on one value, the words that describe what it allows, and a conversion to the stored type."""

    allowed: str
    check: Callable[[Any], bool]
    convert: Callable[[Any], Any] = lambda value: value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, int | float)) and not isinstance(value, bool)


def integer(minimum: int = 0, optional: bool = False) -> Rule:
    allowed = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
    if optional:
        return Rule(f"{allowed} or null", lambda v: v is None or (_is_int(v) and v >= minimum))
    return Rule(allowed, lambda v: _is_int(v) and v >= minimum)


def number(low: float, high: float = math.inf, *, low_inclusive: bool = False) -> Rule:
    """A finite number in (low, high) or [low, high); integers are accepted and stored as floats."""
    if high == math.inf:
        allowed = "a positive finite number" if (low, low_inclusive) == (0, False) else f"a finite number >= {low:g}"
    else:
        allowed = f"a number in {'[' if low_inclusive else '('}{low:g}, {high:g})"

    def check(value: Any) -> bool:
        if not _is_number(value) or not math.isfinite(value):
            return False
        return (value >= low if low_inclusive else value > low) and value < high

    return Rule(allowed, check, float)


def choice(*options: str) -> Rule:
    return Rule("one of " + ", ".join(repr(o) for o in options), lambda v: v in options)


def integer_list(length: int) -> Rule:
    return Rule(
        f"a list of {length} positive integers",
        lambda v: isinstance(v, list) and len(v) == length and all(_is_int(x) and x > 0 for x in v),
        tuple,
    )


BOOLEAN = Rule("true or false", lambda v: isinstance(v, bool))
BOOLEAN_OR_AUTO = Rule("true, false or auto", lambda v: isinstance(v, bool) or v == "auto")
NAME = Rule("a non-empty string", lambda v: isinstance(v, str) and v.strip() != "")
OPTIONAL_NAME = Rule("a non-empty string or null", lambda v: v is None or NAME.check(v))
SEED = integer(0)


def param(rule: Rule) -> Any:
    return field(metadata={"rule": rule})


@dataclass(frozen=True)
class DataParams:
    threshold: float = param(number(0.0, 1.0))
    train_limit: int | None = param(integer(1, optional=True))
    test_limit: int | None = param(integer(1, optional=True))


@dataclass(frozen=True)
class ModelParams:
    latent_dim: int = param(integer(1))
    encoder_filters: tuple[int, int] = param(integer_list(2))
    decoder_filters: tuple[int, int] = param(integer_list(2))


@dataclass(frozen=True)
class TrainParams:
    epochs: int = param(integer(1))
    batch_size: int = param(integer(1))
    learning_rate: float = param(number(0.0))
    schedule: str = param(choice(*SCHEDULES))
    warmup_epochs: int = param(integer(0))
    final_learning_rate: float = param(number(0.0, low_inclusive=True))
    ema_momentum: float = param(number(0.0, 1.0, low_inclusive=True))
    kl: str = param(choice(*KL_MODES))
    beta: float = param(number(0.0, low_inclusive=True))
    precision: str = param(choice(*PRECISIONS))
    jit_compile: bool | str = param(BOOLEAN_OR_AUTO)
    deterministic: bool = param(BOOLEAN)
    steps_per_call: int = param(integer(1))
    strategy: str = param(choice(*STRATEGIES))
    eval_limit: int | None = param(integer(1, optional=True))


    def check(self, where: str) -> None:
        """What no single key's rule can see: the schedule's floor against its peak."""
        if self.schedule == "cosine" and self.final_learning_rate > self.learning_rate:
            raise ParamsError(f"{where}: train.final_learning_rate must be at most train.learning_rate "
                              f"({self.learning_rate:g}), got {self.final_learning_rate:g}")


@dataclass(frozen=True)
class EvaluateParams:
    samples: int = param(integer(1))
    iwae_k: int = param(integer(1))
    decode_batch: int = param(integer(1))


@dataclass(frozen=True)
class VisualizeParams:
    examples: int = param(integer(1))
    prior_grid: int = param(integer(1))
    manifold_size: int = param(integer(2))
    frame_milliseconds: int = param(integer(1))


@dataclass(frozen=True)
class TrackingParams:
    experiment: str = param(NAME)
    sweep: str | None = param(OPTIONAL_NAME)
    required: bool = param(BOOLEAN)


@dataclass(frozen=True)
class RegistryParams:
    model_name: str = param(NAME)


@dataclass(frozen=True)
class Params:
    seed: int = param(SEED)
    data: DataParams = field(metadata={"rule": None})
    model: ModelParams = field(metadata={"rule": None})
    train: TrainParams = field(metadata={"rule": None})
    evaluate: EvaluateParams = field(metadata={"rule": None})
    visualize: VisualizeParams = field(metadata={"rule": None})
    tracking: TrackingParams = field(metadata={"rule": None})
    registry: RegistryParams = field(metadata={"rule": None})


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads `1e-4` as a float (YAML 1.2, as DVC writes it) and refuses duplicate keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _show(value: Any) -> str:
    """A value as the user wrote it in YAML."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, dict):
        return "a mapping"
    return repr(value)


def _build(cls: type, raw: Any, where: str, prefix: str) -> Any:
    names = [f.name for f in dataclasses.fields(cls)]
    section = prefix.rstrip(".") or "the file"
    if not isinstance(raw, dict):
        raise ParamsError(f"{where}: {section} must be a mapping with keys {', '.join(names)}, got {_show(raw)}")
    unknown = sorted(set(raw) - set(names), key=str)
    if unknown:
        raise ParamsError(f"{where}: unknown key {prefix}{unknown[0]} (allowed in {section}: {', '.join(names)})")
    values = {}
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        rule: Rule | None = f.metadata["rule"]
        nested = dataclasses.is_dataclass(f.type)
        if f.name not in raw:
            if nested:
                what = "a section with keys " + ", ".join(x.name for x in dataclasses.fields(f.type))
            else:
                what = rule.allowed
            raise ParamsError(f"{where}: missing key {key} ({what})")
        if nested:
            values[f.name] = _build(f.type, raw[f.name], where, key + ".")
        elif not rule.check(raw[f.name]):
            raise ParamsError(f"{where}: {key} must be {rule.allowed}, got {_show(raw[f.name])}")
        else:
            values[f.name] = rule.convert(raw[f.name])
    return cls(**values)


def parse_params(text: str, where: str = DEFAULT_PARAMS_FILE) -> Params:
    """Validate the YAML text of a params file; raise ParamsError naming the first bad key."""
    try:
        raw = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error)
        raise ParamsError(f"{where}: YAML syntax error{at}: {problem}") from None
    if raw is None:
        sections = ", ".join(f.name for f in dataclasses.fields(Params))
        raise ParamsError(f"{where}: the file is empty; expected the keys {sections}")
    params = _build(Params, raw, where, "")
    params.train.check(where)
    return params


def load_params(path: str | Path = DEFAULT_PARAMS_FILE) -> Params:
    """Read and validate a params file once; raise ParamsError naming the file and the first bad key."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ParamsError(f"{path}: file not found; run from the repository root or pass its path") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ParamsError(f"{path}: cannot be read ({error})") from None
    return parse_params(text, str(path))
