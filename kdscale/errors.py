"""The error kdscale raises for input it cannot use. Its message names the key, file or value
and what was expected; the command line prints it without a traceback, and so does a user's
Trainer script once it builds kdscale's arguments or trainer (`print_errors_in_one_line`)."""

import sys


class KdscaleError(ValueError):
    """Input kdscale cannot use: a config key or value, a file, a model, a cache or a checkpoint.

    The message names it and what was expected; `kdscale` prints it as one line and exits
    with status 2.
    """


def print_errors_in_one_line() -> None:
    """A KdscaleError that no code catches ends the process with its one line
    (`kdscale: error: ...`) instead of a traceback, as the `kdscale` command does. A Trainer
    script is the user's own, so kdscale cannot wrap its `main`; the interpreter's hook for
    uncaught exceptions is the one place left. Any other exception keeps the hook it had."""
    if getattr(sys.excepthook, "kdscale_one_line", False):
        return
    previous = sys.excepthook

    def hook(kind, error, traceback) -> None:
        if issubclass(kind, KdscaleError):
            print(f"kdscale: error: {error}", file=sys.stderr, flush=True)
        else:
            previous(kind, error, traceback)

    hook.kdscale_one_line = True
    sys.excepthook = hook
