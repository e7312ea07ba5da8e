"""Errors that mean "the user's input is wrong": stages report them as one line and a non-zero exit."""


class UserInputError(ValueError):
    """Bad params, data, paths or environment. The message names the culprit and what is allowed."""

    exit_code = 1


class ParamsError(UserInputError):
    """params.yaml is unreadable or does not validate."""

    exit_code = 2


class DataError(UserInputError):
    """A dataset file is missing, truncated, corrupt or not the published one."""


class TrainingError(UserInputError):
    """Training went numerically wrong (NaN or Inf loss); the message says where and what to change."""


class TrackingError(UserInputError):
    """The MLflow store does not answer (and `tracking.required` is true)."""


class DiskFullError(UserInputError):
    """A file could not be written for want of space: a full disk, a quota, or a file-size limit."""
