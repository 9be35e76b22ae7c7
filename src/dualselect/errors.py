"""The one exception type users see: a clear message naming what is wrong and where."""


class DualSelectError(Exception):
    """Bad input or configuration. The message names the file, the record and the problem.

    The CLI prints it as one line (no traceback) and exits with status 2.
    """
