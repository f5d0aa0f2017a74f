#!/usr/bin/env python3
"""Verify a dualdeploy bundle with the bundle contract (contract.bundle.verify_bundle).

Used by the edge playbook on the controller (before sending) and on the device (before activation),
where only the server's venv and the contract package exist. Prints one JSON line
``{"path", "model", "version", "key_id", "files"}`` (``files``: the manifest's sha256 and size of each
file, from the typed manifest) and exits 0, or prints the failing file and exits 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from contract.bundle import BundleError, load_public_key, verify_bundle


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path, help="the bundle folder (a `latest` link is resolved)")
    parser.add_argument("--public-key", type=Path, required=True, help="the signer's ed25519 public key")
    args = parser.parse_args()
    try:
        verified = verify_bundle(args.bundle.resolve(), load_public_key(args.public_key))
    except BundleError as exc:
        print(f"bundle {args.bundle} failed verification: {exc}", file=sys.stderr)
        return 1
    print(
        json.dumps(
            {
                "path": str(verified.path),
                "model": verified.manifest.model,
                "version": verified.manifest.version,
                "key_id": verified.key_id,
                "files": {rel: entry.model_dump() for rel, entry in verified.manifest.files.items()},
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
