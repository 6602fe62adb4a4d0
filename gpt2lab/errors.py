"""The one exception type for mistakes a user can fix.

Library code raises `UserError` (a `ValueError`) when the input it was handed
is wrong: a missing path, a data directory made with another tokenizer, a
corrupt shard. The message says what is wrong *and* how to fix it. The CLI
prints it as a single `error: ...` line and exits with status 2; everything
else is a bug and keeps its traceback.
"""


class UserError(ValueError):
    """Bad input or a bad argument; the message names the problem and the fix."""


class Interrupted(Exception):
    """Ctrl-C, handled: the message says where the work stopped and how to go on (the CLI exits 130)."""
