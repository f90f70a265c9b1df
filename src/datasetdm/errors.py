"""One exception type for bad input, so the CLI can print it plainly and exit non-zero."""


class DatasetdmError(Exception):
    """A problem with the user's input (a file, a flag, a model folder). The message names it."""


def run_script(main) -> None:
    """Run a bench or script's ``main()``: bad input ends it with one line naming the problem and
    exit status 1, not a traceback (the CLI does the same with status 2). DATASETDM_DEBUG=1 shows
    the traceback instead, as in the CLI."""
    import os

    try:
        main()
    except DatasetdmError as err:
        if os.environ.get("DATASETDM_DEBUG"):
            raise
        raise SystemExit(f"error: {err}") from None
