#!/usr/bin/env python3
"""Verify a dualdeploy bundle with the bundle contract (contract.bundle.verify_bundle).

Used by the edge playbook on the controller (before sending) and on the device (before activation),
where only the server's venv and the contract package exist. Prints one JSON line
``{"path", "model", "version", "key_id", "dev_key", "files"}`` (``files``: the manifest's sha256 and size
of each file, from the typed manifest; ``dev_key``: the trusted key is the development key given with
``--dev-public-key``) and exits 0, or prints the failing file and exits 1.

A bundle signed with the development key verifies like any other, since the trusted key is whatever the
inventory names; ``--dev-public-key`` makes the verifier say so, and without ``--allow-dev-key`` refuse
it (exit 3), naming the setting that allows it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from contract.bundle import BundleError, key_id, load_public_key, verify_bundle

EXIT_DEV_KEY = 3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path, help="the bundle folder (a `latest` link is resolved)")
    parser.add_argument("--public-key", type=Path, required=True, help="the signer's ed25519 public key")
    parser.add_argument(
        "--dev-public-key",
        type=Path,
        help="the development key's public key; a bundle it signs is refused unless --allow-dev-key "
        "(absent file: no development key exists here)",
    )
    parser.add_argument(
        "--allow-dev-key", action="store_true", help="accept a bundle signed with the development key"
    )
    args = parser.parse_args()
    try:
        public_key = load_public_key(args.public_key)
        verified = verify_bundle(args.bundle.resolve(), public_key)
        dev_key = bool(
            args.dev_public_key
            and args.dev_public_key.is_file()
            and key_id(load_public_key(args.dev_public_key)) == verified.key_id
        )
    except BundleError as exc:
        print(f"bundle {args.bundle} failed verification: {exc}", file=sys.stderr)
        return 1
    if dev_key and not args.allow_dev_key:
        print(
            f"bundle {args.bundle} is signed with the development key {args.dev_public_key} "
            f"(key {verified.key_id}): refused. Sign it with the site's key (model_build --key), or set "
            "edge_allow_dev_key: true for a test site.",
            file=sys.stderr,
        )
        return EXIT_DEV_KEY
    print(
        json.dumps(
            {
                "path": str(verified.path),
                "model": verified.manifest.model,
                "version": verified.manifest.version,
                "key_id": verified.key_id,
                "dev_key": dev_key,
                # A calibrated edge-cloud cascade (schema 4): what edge_escalation=low_confidence needs.
                "cascade": verified.manifest.cascade is not None,
                "files": {rel: entry.model_dump() for rel, entry in verified.manifest.files.items()},
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
