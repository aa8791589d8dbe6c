"""The project's error type: a message a user can act on, printed by the CLI in one line."""


class EvomergeError(Exception):
    """A user-facing error. The CLI prints ``str(err)`` on one line and exits non-zero."""


class IncompatibleModelsError(EvomergeError):
    """Checkpoints that cannot be merged with each other (names, shapes, families)."""
