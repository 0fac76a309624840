"""User-facing errors: one clear message, a non-zero exit, no traceback."""


class UserError(Exception):
    """A problem with the user's input (config, corpus, shard, checkpoint).

    The message names the thing that is wrong and how to fix it. The CLI prints it
    as one line and exits with code 2; it never shows a traceback for these.
    """

    exit_code = 2


class Stopped(Exception):
    """Training stopped on request (SIGTERM / SIGINT) after writing a checkpoint: resumable.

    The CLI prints the message and exits with code 75 (EX_TEMPFAIL, "try again"), which a
    cluster's requeue logic can tell apart from a failure.
    """

    exit_code = 75
