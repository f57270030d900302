"""Errors a user can act on: the CLI prints their message, without a traceback."""


class LlamatailorError(Exception):
    """Base class: the message names the file, key or record at fault and what was expected."""


class ConfigError(LlamatailorError):
    """The run file or an override is invalid."""


class DataError(LlamatailorError):
    """Input data cannot be used as a whole (single bad records go to rejected.jsonl instead)."""


class ModelLoadError(LlamatailorError):
    """A model or tokenizer cannot be found, downloaded or understood."""


class StageError(LlamatailorError):
    """A stage cannot start because what it needs from an earlier stage is missing."""


class TrainingDiverged(LlamatailorError):
    """The loss or the weights became NaN/inf; the message says what to change."""


class CheckFailed(LlamatailorError):
    """A hand-off check failed (merge equality, an export gate); the message says which file and by how much."""


class EncodingError(LlamatailorError):
    """A text file is not UTF-8 (with or without a byte-order mark); the message names the encoding found."""
