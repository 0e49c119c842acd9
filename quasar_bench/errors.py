"""User-facing errors: one line that names the problem and the fix."""


class QuasarError(Exception):
    """Raised for bad input. The CLI prints it as one line and exits with status 2."""


def unknown(what: str, value, options, hint: str = "") -> QuasarError:
    """The one wording of "not one of the known names": `unknown drafter 'x'; choose one of a, b`."""
    return QuasarError(f"unknown {what} {value!r}; choose one of {', '.join(map(str, options))}{hint}")
