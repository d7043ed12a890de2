"""User-facing failures. Each carries one plain sentence and the exit code the CLI returns for it."""


class DMMError(Exception):
    """A runtime failure the user can act on (exit code 1)."""

    exit_code = 1


class BadInput(DMMError):
    """Bad usage or bad input: a file, field, value or reference the user gave (exit code 2)."""

    exit_code = 2


class ModelError(BadInput):
    """A model reference or model folder that cannot be used."""


class RecipeError(BadInput):
    """A recipe that does not validate; the message names the file and the field path."""


class NetworkError(DMMError):
    """The Hub could not be reached or refused a download."""


class ProcessLost(DMMError):
    """Another process of a multi-process run died or stopped answering. The launcher then stops this one too:
    that stop signal is a consequence, so this error, not an interrupt, is what the user is told."""
