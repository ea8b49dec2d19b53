"""One exception type for every user-facing failure: the CLI prints it as one line."""


class PetahError(Exception):
    """Bad input or a refused operation; the message says what and where."""
