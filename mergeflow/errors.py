class MergeflowError(Exception):
    """A user-facing error: its message is one line naming the file, key, tensor or value at fault."""


class MergeflowWarning(UserWarning):
    """Something the user should know that does not stop the work (a model given twice, a
    fine-tune identical to the base); the command line prints it as one ``mergeflow: warning:`` line."""
