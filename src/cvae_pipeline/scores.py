"""The names of the data's splits and of the scores computed on them, spelled in this one place.

The stages write them (train's history and final metrics, evaluate's metrics), MLflow records them, and the figures,
the comparison of experiments, the registry and `dvc.yaml`'s plots read them:
- after each epoch, train scores one split (the validation set, or the test set where there is none): the columns
  `<split>_elbo`, `<split>_reconstruction`, `<split>_kl` of `reports/train_history.csv`, beside `train_loss`; the last
  epoch's are in `reports/train_metrics.json`, and in MLflow as `final_<name>`;
- evaluate scores every split but train: `reports/metrics.json` holds `{split: {score: value}}`, which `dvc exp show`
  names `<split>.<score>` and MLflow `eval_<split>_<score>`.
"""

TRAIN, VALIDATION, TEST = "train", "validation", "test"
SPLITS = (TRAIN, VALIDATION, TEST)  # as the prepared file holds them

# After each epoch, on the scored split.
TRAIN_LOSS = "train_loss"  # the training objective's mean over the epoch's steps: the negative ELBO (beta = 1)
ELBO, RECONSTRUCTION, KL = "elbo", "reconstruction", "kl"
EPOCH_SCORES = (ELBO, RECONSTRUCTION, KL)

# evaluate's, per split.
RECONSTRUCTION_NLL, IWAE, IWAE_K = "reconstruction_nll", "iwae", "iwae_k"
PIXEL_ACCURACY, BCE_PER_PIXEL, ACTIVE_UNITS = "pixel_accuracy", "bce_per_pixel", "active_units"
SAMPLES, IMAGES = "samples", "images"  # how it was scored: draws of z per image, images scored
EVALUATED = (ELBO, RECONSTRUCTION_NLL, KL, IWAE, IWAE_K, PIXEL_ACCURACY, BCE_PER_PIXEL, ACTIVE_UNITS, SAMPLES, IMAGES)


def per_epoch(split: str, score: str = ELBO) -> str:
    """`validation_elbo`: a score taken after each epoch on `split` (a column of train's history)."""
    return f"{split}_{score}"


def epoch_columns(split: str) -> tuple[str, ...]:
    """The history's scores of `split`: its ELBO, reconstruction and KL, in that order."""
    return tuple(per_epoch(split, score) for score in EPOCH_SCORES)


def scored_split(columns) -> str:
    """The split whose scores `columns` (a history's, or the last epoch's metrics) hold: validation, or test."""
    return VALIDATION if per_epoch(VALIDATION) in columns else TEST


def final(name: str) -> str:
    """`final_validation_elbo`: one of train's final metrics as MLflow records it."""
    return f"final_{name}"


def evaluated(split: str, score: str = ELBO) -> str:
    """`eval_validation_elbo`: one of evaluate's scores as MLflow records it."""
    return f"eval_{split}_{score}"


def experiment_column(split: str, score: str = ELBO) -> str:
    """`validation.elbo`: one of evaluate's scores as `dvc exp show` names it."""
    return f"{split}.{score}"
