"""The one exception type users see.

Every error caused by bad input (unknown model, malformed dataset, mismatched prompt lengths,
NaN metrics, ...) is a :class:`KcircuitsError` with a one-line message that says what to do.
The CLI turns it into that line on stderr and exit code 2; anything else is a bug.
"""


class KcircuitsError(ValueError):
    """A user-facing error: bad input or an unsupported configuration."""
