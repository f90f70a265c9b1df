"""One exception type for bad input, so the CLI can print it plainly and exit non-zero."""


class DatasetdmError(Exception):
    """A problem with the user's input (a file, a flag, a model folder). The message names it."""
