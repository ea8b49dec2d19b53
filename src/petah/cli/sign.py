"""Signing verbs: make a key pair, sign a package, verify one against trusted keys."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from petah.cli.common import JsonOpt, emit_json, out


def keygen(
    output: Annotated[Path, typer.Option("--output", "-o", help="NAME: writes NAME.key (private, mode 0600) and "
                                                               "NAME.pub.")],
    json_out: JsonOpt = False,
) -> None:
    """Make an Ed25519 key pair for signing packages (keep NAME.key private; hand out NAME.pub)."""
    from petah.packages import generate_keypair

    private, public, kid = generate_keypair(output)
    if json_out:
        emit_json({"private_key": str(private), "public_key": str(public), "keyid": kid})
        return
    out.print(f"wrote {private} (private, mode 0600) and {public}; key id {kid}", highlight=False, soft_wrap=True)


def sign(
    package: Annotated[Path, typer.Argument(help="The .petah package to sign (rewrites only its signature slot).")],
    key: Annotated[Path, typer.Option("--key", help="The private key (NAME.key from petah keygen).")],
    json_out: JsonOpt = False,
) -> None:
    """Sign a package's content hash; earlier signatures by other keys are kept."""
    from petah.packages import sign_package

    kid = sign_package(package, key)
    if json_out:
        emit_json({"package": str(package), "keyid": kid})
        return
    out.print(f"signed {package} with key {kid}", highlight=False, soft_wrap=True)


def verify(
    package: Annotated[Path, typer.Argument(help="The .petah package to check.")],
    trust: Annotated[Path, typer.Option("--trust", help="Folder of trusted public keys (*.pub).")],
    json_out: JsonOpt = False,
) -> None:
    """Check a package's hash and that a trusted key signed it (exit 0), else a one-line reason (exit 2)."""
    from petah.packages import TrustPolicy, read_package

    policy = TrustPolicy.from_options(trust, require_signed=True)
    loaded = read_package(package)
    signers = policy.check(loaded, f"package {package}")
    if json_out:
        emit_json({"package": str(package), "content_sha256": loaded.manifest.content_sha256,
                   "trusted_signers": signers})
        return
    out.print(f"{package}: signed by trusted key {', '.join(signers)}", highlight=False, soft_wrap=True)


COMMANDS = {"keygen": keygen, "sign": sign, "verify": verify}
