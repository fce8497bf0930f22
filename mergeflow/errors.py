class MergeflowError(Exception):
    """A user-facing error: its message is one line naming the file, key, tensor or value at fault."""
