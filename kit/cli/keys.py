"""``otkit keygen``: an ed25519 key pair for signing reports (docs/signing.md)."""

from __future__ import annotations

import os
from pathlib import Path

import click

from kit.cli.common import emit_json, status

__all__ = ["keygen"]


@click.command("keygen", epilog="""\b
Exit statuses:
  0  the pair was written
  2  usage or input error (a file of the pair exists without --force, no such folder)""")
@click.option("--out", "prefix", default="otkit-signing", show_default=True, type=click.Path(path_type=Path),
              metavar="PREFIX", help="Write PREFIX.key (private, mode 0600) and PREFIX.pub (public).")
@click.option("--force", is_flag=True, help="Replace an existing pair.")
def keygen(prefix: Path, force: bool) -> None:
    """Make an ed25519 key pair for otkit audit|certify|run --sign-key.

    The private key is PKCS#8 PEM, encrypted when $OTKIT_SIGN_PASSWORD is set (the signing commands read the same
    variable); the public key is PEM (SubjectPublicKeyInfo), to publish beside the release for otkit verify
    --public-key. Prints the paths and the key id (sha256 of the public key's DER) as JSON.
    """
    from kit.signing import PASSWORD_ENV, generate_keypair

    private, public, keyid = generate_keypair(prefix, force=force)
    emit_json({"private_key": str(private), "public_key": str(public), "keyid": keyid})
    encrypted = "encrypted with $" + PASSWORD_ENV if os.environ.get(PASSWORD_ENV) else "not encrypted"
    status(f"wrote {private} (keep it secret; {encrypted}) and {public} (publish it)")
