"""Broken params.yaml files, each with the line it must be refused with: shared by the config unit tests and the
end-to-end check that every stage stops on them."""

import copy
import re

import yaml

from helpers import REPO

SHIPPED_TEXT = (REPO / "params.yaml").read_text()
SHIPPED = yaml.safe_load(SHIPPED_TEXT)
SECTIONS = "seed, data, model, train, evaluate, visualize, tracking"


def with_learning_rate(literal: str) -> str:
    """The shipped file, comments and all, with the learning rate written as `literal`."""
    return re.sub(r"(?m)^(  learning_rate:) \S+", rf"\1 {literal}", SHIPPED_TEXT)


def edited(change) -> str:
    raw = copy.deepcopy(SHIPPED)
    change(raw)
    return yaml.safe_dump(raw)


def set_key(section, key, value):
    def change(raw):
        raw[section][key] = value
    return change


BROKEN = [
    ("negative batch", edited(set_key("train", "batch_size", -3)),
     "params.yaml: train.batch_size must be a positive integer, got -3"),
    ("zero epochs", edited(set_key("train", "epochs", 0)), "train.epochs must be a positive integer, got 0"),
    ("negative validation size", edited(set_key("data", "validation_size", -1)),
     "data.validation_size must be an integer >= 0 and < 60,000 (MNIST's training images), got -1"),
    ("no training images left", edited(set_key("data", "validation_size", 60000)),
     "params.yaml: data.validation_size must be an integer >= 0 and < 60,000 (MNIST's training images), got 60000"),
    ("float latent", edited(set_key("model", "latent_dim", 2.5)),
     "model.latent_dim must be a positive integer, got 2.5"),
    ("bool latent", edited(set_key("model", "latent_dim", True)),
     "model.latent_dim must be a positive integer, got true"),
    ("zero latent", edited(set_key("model", "latent_dim", 0)), "model.latent_dim must be a positive integer, got 0"),
    ("string lr", edited(set_key("train", "learning_rate", "fast")),
     "train.learning_rate must be a positive finite number, got 'fast'"),
    ("negative lr", edited(set_key("train", "learning_rate", -0.1)), "train.learning_rate must be a positive finite"),
    ("nan lr", with_learning_rate(".nan"),
     "train.learning_rate must be a positive finite number, got nan"),
    ("threshold 1", edited(set_key("data", "threshold", 1.0)), "data.threshold must be a number in (0, 1), got 1.0"),
    ("limit zero", edited(set_key("data", "train_limit", 0)),
     "data.train_limit must be a positive integer or null, got 0"),
    ("filters length", edited(set_key("model", "encoder_filters", [32])),
     "model.encoder_filters must be a list of 2 positive integers, got [32]"),
    ("unknown kl", edited(set_key("train", "kl", "exact")),
     "train.kl must be one of 'analytic', 'monte_carlo', got 'exact'"),
    ("unknown precision", edited(set_key("train", "precision", "float8")),
     "train.precision must be one of 'auto', 'float32', 'mixed_float16', 'mixed_bfloat16', got 'float8'"),
    ("unknown schedule", edited(set_key("train", "schedule", "linear")),
     "train.schedule must be one of 'constant', 'cosine', got 'linear'"),
    ("negative warm-up", edited(set_key("train", "warmup_epochs", -1)),
     "train.warmup_epochs must be an integer >= 0, got -1"),
    ("floor above the peak", edited(lambda raw: raw["train"].update(schedule="cosine", learning_rate=1e-3,
                                                                    final_learning_rate=2e-3)),
     "params.yaml: train.final_learning_rate must be at most train.learning_rate (0.001), got 0.002"),
    ("negative floor", edited(set_key("train", "final_learning_rate", -1e-5)),
     "train.final_learning_rate must be a finite number >= 0, got -1e-05"),
    ("negative beta", edited(set_key("train", "beta", -1)), "train.beta must be a finite number >= 0, got -1"),
    ("average of no step", edited(set_key("train", "ema_momentum", 1)),
     "train.ema_momentum must be a number in [0, 1), got 1"),
    ("jit not a bool", edited(set_key("train", "jit_compile", "yes")),
     "train.jit_compile must be true, false or auto, got 'yes'"),
    ("deterministic not a bool", edited(set_key("train", "deterministic", "auto")),
     "train.deterministic must be true or false, got 'auto'"),
    ("empty experiment", edited(set_key("tracking", "experiment", " ")),
     "tracking.experiment must be a non-empty string, got ' '"),
    ("required not a bool", edited(set_key("tracking", "required", "no")),
     "tracking.required must be true or false, got 'no'"),
    ("negative seed", edited(lambda raw: raw.update(seed=-1)), "seed must be an integer >= 0, got -1"),
    ("unknown key", edited(set_key("train", "batchsize", 10)),
     "unknown key train.batchsize (allowed in train: epochs, batch_size, learning_rate, schedule, "),
    ("unknown section", edited(lambda raw: raw.update(optimizer={"name": "sgd"})), "unknown key optimizer"),
    ("missing key", edited(lambda raw: raw["train"].pop("epochs")), "missing key train.epochs (a positive integer)"),
    ("missing section", edited(lambda raw: raw.pop("model")), "missing key model (a section with keys latent_dim"),
    ("section not a mapping", edited(lambda raw: raw.update(data=[1, 2])), "data must be a mapping with keys"),
    ("top level list", "- 1\n- 2\n", f"the file must be a mapping with keys {SECTIONS}"),
    ("syntax error", "train:\n  epochs: [1, 2\n", "params.yaml: YAML syntax error at line"),
    ("tab indentation", "train:\n\tepochs: 3\n", "params.yaml: YAML syntax error"),
    ("duplicate key", "seed: 0\nseed: 1\n", "duplicate key 'seed'"),
    ("empty file", "", f"params.yaml: the file is empty; expected the keys {SECTIONS}"),
    ("comments only", "# nothing here\n", "the file is empty"),
]
