"""One exception type for every user-facing error.

The CLI prints ``QloraKitError`` messages without a traceback: each message names what is wrong
(the file, key, row or field) and how to fix it.
"""


class QloraKitError(Exception):
    """A problem with the user's input or environment, explained in the message."""
