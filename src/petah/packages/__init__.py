"""The ``.petah`` task package: format (codec, content hash, signature slot), typed manifest,
signatures, opening one for a backbone.

The core both sides stand on, numpy and safetensors only: the build side writes packages through
it, the device side reads and verifies them. Attaching a package to a torch model is the torch
runtime's (``petah.runtime.attach``).
"""

from petah.packages.format import (
    TaskPackage,
    content_sha256,
    encode_package,
    read_manifest,
    read_package,
    set_signature,
    signed_message,
    upgrade_package,
    write_package,
)
from petah.packages.manifest import (
    ADAPTER_DTYPES,
    FORMAT_VERSION,
    TASK_KIND_NAMES,
    BackboneRef,
    Manifest,
    PlanRecord,
    TaskInfo,
    check_task_name,
)
from petah.packages.open import check_backbone, describe_package, open_package
from petah.packages.signing import (
    SignatureError,
    TrustPolicy,
    TrustStore,
    generate_keypair,
    read_trusted,
    sign_package,
)

__all__ = [
    "ADAPTER_DTYPES", "FORMAT_VERSION", "TASK_KIND_NAMES", "BackboneRef", "Manifest", "PlanRecord", "TaskInfo",
    "TaskPackage", "check_backbone", "check_task_name", "content_sha256", "describe_package", "encode_package",
    "open_package", "read_manifest", "read_package", "set_signature", "signed_message", "upgrade_package",
    "write_package", "SignatureError", "TrustPolicy", "TrustStore", "generate_keypair", "read_trusted", "sign_package",
]
