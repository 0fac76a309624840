"""User-facing errors: one clear message, a non-zero exit, no traceback."""


class UserError(Exception):
    """A problem with the user's input (config, corpus, shard, checkpoint).

    The message names the thing that is wrong and how to fix it. The CLI prints it
    as one line and exits with code 2; it never shows a traceback for these.
    """

    exit_code = 2
