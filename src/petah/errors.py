"""One exception type for every user-facing failure: the CLI prints it as one line."""


class PetahError(Exception):
    """Bad input or a refused operation; the message says what and where."""


class BackboneMismatch(PetahError):
    """A package (or state) made for another backbone; the message names both (a server answers 409)."""


class EngineCannotRun(PetahError):
    """A valid package this engine cannot run (a kind or format it lacks, e.g. a dense package
    without its head graph on a device install): stored packages stay where they are."""


class PetahWarning(UserWarning):
    """Something the user should know that does not stop the operation (the CLI prints one line)."""
