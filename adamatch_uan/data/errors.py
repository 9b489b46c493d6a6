"""The error every data loader raises for bad files or specs."""


class DomainError(ValueError):
    """A domain's files are missing, corrupted or malformed; the message says which and how to fix it."""
