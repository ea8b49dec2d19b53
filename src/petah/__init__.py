"""petah: parameter-efficient multi-task adaptation of hybrid vision transformers."""

__version__ = "0.1.0"

from petah.errors import PetahError  # noqa: E402

__all__ = ["PetahError", "__version__"]
