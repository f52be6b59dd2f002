"""The one exception type the command line turns into a one-line message (no traceback)."""


class PatchCoreError(Exception):
    """A problem the user can fix: the message names the file or setting and what to do."""


class NotFittedError(PatchCoreError, AttributeError):
    """The model was used before ``fit`` (or ``load``)."""
