"""The one error type the CLI turns into a single clear line and a non-zero exit."""


class ClipPruneError(ValueError):
    """A user-facing configuration or input error: its message is one line that says what to fix."""
