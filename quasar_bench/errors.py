"""User-facing errors: one line that names the problem and the fix."""


class QuasarError(Exception):
    """Raised for bad input. The CLI prints it as one line and exits with status 2."""
