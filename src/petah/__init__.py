"""petah: parameter-efficient multi-task adaptation of hybrid vision transformers."""

__version__ = "0.1.0"
# the bundled demo backbone (assets/README.md), shared by the build side and the device demo
DEMO_BACKBONE = "efficientformerv2_s0-64-fashion.safetensors"

from petah.errors import PetahError  # noqa: E402

__all__ = ["DEMO_BACKBONE", "PetahError", "__version__"]
