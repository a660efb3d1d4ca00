"""User-facing errors: one line that says what is wrong and what to do about it."""


class SpfbenchError(Exception):
    """Bad input or a missing resource. The CLI prints the message on one line and exits non-zero."""


class MissingWeightsError(SpfbenchError):
    """A model file is neither on disk nor in the Hugging Face cache (and may not be downloaded)."""
