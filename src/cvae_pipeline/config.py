"""Typed, validated view of params.yaml: one frozen pydantic model per section, loaded once and passed down.

Each field says in its description what values it allows, in words. `load_params` checks the whole file before any
stage does work and reports the first problem as one line that names the key path:
`params.yaml: train.batch_size must be a positive integer, got -3`. Validation is pydantic's, in strict mode (no
`"3"` for 3, no `true` for 1); the one-line message is made here from its first error.
"""

import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError

from cvae_pipeline.errors import ParamsError

DEFAULT_PARAMS_FILE = "params.yaml"
KL_MODES = ("analytic", "monte_carlo")
PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")
STRATEGIES = ("auto", "one_device", "mirrored", "multi_worker")
SCHEDULES = ("constant", "cosine")
# Not a param: the tutorial's published test ELBO (2020 edition, 100 epochs), the quality a recipe is timed to reach.
TUTORIAL_ELBO = -78.3
# Not a param: MNIST's training images, of which data.validation_size are held out; known before any download, so a
# validation set that would leave none to train on is refused with the other params errors.
MNIST_TRAIN_IMAGES = 60_000

POSITIVE_INTEGER = "a positive integer"
POSITIVE_NUMBER = "a positive finite number"
NUMBER_FROM_ZERO = "a finite number >= 0"
BOOLEAN = "true or false"
NAME = "a non-empty string"


def one_of(options: tuple[str, ...]) -> str:
    return "one of " + ", ".join(repr(option) for option in options)


def allows(description: str, **constraints: Any) -> Any:
    """A field allowing what `description` says (the words of its error message), checked by `constraints`."""
    return Field(description=description, **constraints)


PositiveInteger = Annotated[int, Strict(), Field(gt=0)]
Filters = tuple[PositiveInteger, PositiveInteger]  # YAML gives a list: the field itself takes one (strict=False)


class Section(BaseModel):
    """A section of params.yaml: every key required, none unknown, values of exactly the allowed types, frozen."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class DataParams(Section):
    threshold: float = allows("a number in (0, 1)", gt=0, lt=1)
    validation_size: int = allows(f"an integer >= 0 and < {MNIST_TRAIN_IMAGES:,} (MNIST's training images)", ge=0,
                                  lt=MNIST_TRAIN_IMAGES)
    validation_seed: int = allows("an integer >= 0", ge=0)
    train_limit: PositiveInteger | None = allows(f"{POSITIVE_INTEGER} or null")
    test_limit: PositiveInteger | None = allows(f"{POSITIVE_INTEGER} or null")


class ModelParams(Section):
    latent_dim: int = allows(POSITIVE_INTEGER, gt=0)
    encoder_filters: Filters = allows("a list of 2 positive integers", strict=False)
    decoder_filters: Filters = allows("a list of 2 positive integers", strict=False)


class TrainParams(Section):
    epochs: int = allows(POSITIVE_INTEGER, gt=0)
    batch_size: int = allows(POSITIVE_INTEGER, gt=0)
    learning_rate: float = allows(POSITIVE_NUMBER, gt=0, allow_inf_nan=False)
    schedule: Literal[SCHEDULES] = allows(one_of(SCHEDULES))
    warmup_epochs: int = allows("an integer >= 0", ge=0)
    final_learning_rate: float = allows(NUMBER_FROM_ZERO, ge=0, allow_inf_nan=False)
    ema_momentum: float = allows("a number in [0, 1)", ge=0, lt=1)
    kl: Literal[KL_MODES] = allows(one_of(KL_MODES))
    beta: float = allows(NUMBER_FROM_ZERO, ge=0, allow_inf_nan=False)
    precision: Literal[PRECISIONS] = allows(one_of(PRECISIONS))
    jit_compile: bool | Literal["auto"] = allows("true, false or auto")
    deterministic: bool = allows(BOOLEAN)
    steps_per_call: int = allows(POSITIVE_INTEGER, gt=0)
    strategy: Literal[STRATEGIES] = allows(one_of(STRATEGIES))
    eval_limit: PositiveInteger | None = allows(f"{POSITIVE_INTEGER} or null")

    def check(self, where: str) -> None:
        """What no single key's rule can see: the schedule's floor against its peak."""
        if self.schedule == "cosine" and self.final_learning_rate > self.learning_rate:
            raise ParamsError(f"{where}: train.final_learning_rate must be at most train.learning_rate "
                              f"({self.learning_rate:g}), got {self.final_learning_rate:g}")


class EvaluateParams(Section):
    samples: int = allows(POSITIVE_INTEGER, gt=0)
    iwae_k: int = allows(POSITIVE_INTEGER, gt=0)
    decode_batch: int = allows(POSITIVE_INTEGER, gt=0)


class VisualizeParams(Section):
    examples: int = allows(POSITIVE_INTEGER, gt=0)
    prior_grid: int = allows(POSITIVE_INTEGER, gt=0)
    manifold_size: int = allows("an integer >= 2", ge=2)
    frame_milliseconds: int = allows(POSITIVE_INTEGER, gt=0)


class TrackingParams(Section):
    experiment: str = allows(NAME, pattern=r"\S")
    sweep: Annotated[str, Field(pattern=r"\S")] | None = allows(f"{NAME} or null")
    required: bool = allows(BOOLEAN)


class RegistryParams(Section):
    model_name: str = allows(NAME, pattern=r"\S")


class Params(Section):
    seed: int = allows("an integer >= 0", ge=0)
    data: DataParams
    model: ModelParams
    train: TrainParams
    evaluate: EvaluateParams
    visualize: VisualizeParams
    tracking: TrackingParams
    registry: RegistryParams

    def flat(self) -> dict[str, str]:
        """`{"train.batch_size": "100", ...}`: every param by its key path, valued as params.yaml spells it (null,
        false, [32, 64]; strings bare), as MLflow records params."""
        flat: dict[str, str] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict):
                for key, inner in value.items():
                    walk(f"{prefix}{key}.", inner)
            else:
                flat[prefix.rstrip(".")] = value if isinstance(value, str) else json.dumps(value)

        walk("", self.model_dump())
        return flat


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


def _section(cls: type[Section]) -> str:
    return "a section with keys " + ", ".join(cls.model_fields)


def _problem(error: dict, raw: Any) -> str:
    """pydantic's first error as what the user must change: the key path, what it allows, and what it holds."""
    cls, value, path = Params, raw, []
    for part in error["loc"]:  # down the sections to the key; deeper parts (a list's items) belong to the key
        if not isinstance(part, str):
            break
        field = cls.model_fields.get(part)
        path.append(part)
        value = value.get(part) if isinstance(value, dict) else None
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, Section)):
            cls = field
            break
        cls = field.annotation
    key = ".".join(path)
    if error["type"] == "extra_forbidden":
        parent = ".".join(path[:-1])
        owner = Params if not parent else _owner(parent)
        return f"unknown key {key} (allowed in {parent or 'the file'}: {', '.join(owner.model_fields)})"
    if isinstance(cls, type):  # a whole section: missing, or not a mapping
        if error["type"] == "missing":
            return f"missing key {key} ({_section(cls)})"
        return f"{key or 'the file'} must be a mapping with keys {', '.join(cls.model_fields)}, got {_show(value)}"
    if error["type"] == "missing" and len(error["loc"]) == len(path):
        return f"missing key {key} ({cls.description})"
    return f"{key} must be {cls.description}, got {_show(value)}"


def _owner(section: str) -> type[Section]:
    return Params.model_fields[section].annotation


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
        raise ParamsError(f"{where}: the file is empty; expected the keys {', '.join(Params.model_fields)}")
    try:
        params = Params.model_validate(raw)
    except ValidationError as error:
        raise ParamsError(f"{where}: {_problem(error.errors()[0], raw)}") from None
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
