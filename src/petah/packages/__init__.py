"""The ``.petah`` task package: format (codec, content hash, signature slot), typed manifest, attach.

The core both sides stand on: the build side writes packages through it, the device side reads
and attaches them; it imports nothing from the training stack.
"""

from petah.packages.attach import (
    DTYPES,
    LoadedTask,
    attach_adapters,
    attach_package,
    build_package,
    check_backbone,
    check_dtype,
    describe_package,
    head_from_package,
    load_task,
    merged_backbone,
    open_package,
)
from petah.packages.format import (
    TaskPackage,
    content_sha256,
    encode_package,
    pack_tensors,
    read_manifest,
    read_package,
    set_signature,
    signed_message,
    upgrade_package,
    write_package,
)
from petah.packages.manifest import FORMAT_VERSION, BackboneRef, Manifest, PlanRecord, TaskInfo, check_task_name
from petah.packages.signing import (
    SignatureError,
    TrustPolicy,
    TrustStore,
    generate_keypair,
    read_trusted,
    sign_package,
)

__all__ = [
    "DTYPES", "FORMAT_VERSION", "BackboneRef", "LoadedTask", "Manifest", "PlanRecord", "TaskInfo", "TaskPackage",
    "attach_adapters", "attach_package", "build_package", "check_backbone", "check_dtype", "check_task_name",
    "content_sha256", "describe_package", "encode_package", "head_from_package", "load_task", "merged_backbone",
    "open_package", "pack_tensors", "read_manifest", "read_package", "set_signature", "signed_message",
    "upgrade_package", "write_package", "SignatureError", "TrustPolicy", "TrustStore", "generate_keypair",
    "read_trusted", "sign_package",
]
