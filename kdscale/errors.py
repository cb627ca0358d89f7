"""The error kdscale raises for input it cannot use. Its message names the key, file or value
and what was expected; the command line prints it without a traceback."""


class KdscaleError(ValueError):
    """Input kdscale cannot use: a config key or value, a file, a model, a cache or a checkpoint.

    The message names it and what was expected; `kdscale` prints it as one line and exits
    with status 2.
    """
