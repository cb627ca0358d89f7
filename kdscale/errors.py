"""The error kdscale raises for input it cannot use. Its message names the key, file or value
and what was expected; the command line prints it without a traceback."""


class KdscaleError(ValueError):
    pass
