"""The one exception type of the SavedModel tools, so command-line entry points can print any
user-facing failure as one line without a traceback."""


class SavedModelError(ValueError):
    """A SavedModel, a frozen model, a signature or an option is wrong or unsafe.

    The message is one line naming the file, signature key, op or node concerned.
    """
