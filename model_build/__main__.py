"""Command line: ``python -m model_build build SPEC --out dist`` and ``verify BUNDLE_DIR``."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from contract import bundle

from .errors import BuildError

DEV_PUBLIC_KEY = Path(".keys/dev-ed25519.pub")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m model_build",
        description="Prebuild a PyTorch model into a signed bundle (ONNX FP32, INT8, TensorRT), "
        "or verify one.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="Run every stage of a model spec and write dist/<model>/<version>/.")
    b.add_argument("spec", type=Path, help="Model spec YAML, e.g. models/demo.yaml.")
    b.add_argument(
        "--out", type=Path, default=Path("dist"), help="Dist folder that receives the bundle (default: dist)."
    )
    b.add_argument(
        "--key",
        type=Path,
        default=None,
        help="PEM ed25519 private key to sign with. Default: the development key .keys/dev-ed25519.pem "
        "(generated on first use, with a loud warning).",
    )
    b.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(".cache/model_build"),
        help="Stage cache folder (default: .cache/model_build).",
    )
    b.add_argument(
        "--force",
        action="store_true",
        help="Write the bundle again even when it exists (stages still come from the cache).",
    )
    v = sub.add_parser(
        "verify", help="Check a bundle's signature and every file's sha256; exit 0 only if all hold."
    )
    v.add_argument("bundle", type=Path, help="Bundle folder, e.g. dist/demo/latest.")
    v.add_argument(
        "--public-key",
        type=Path,
        default=None,
        help=f"PEM ed25519 public key of the signer. Default: {DEV_PUBLIC_KEY} (with a warning).",
    )
    return parser


def _build(args: argparse.Namespace) -> int:
    from .pipeline import build, summary_table
    from .spec import load_spec

    spec = load_spec(args.spec)
    result = build(spec, args.out, key_path=args.key, cache_root=args.cache_dir, force=args.force)
    print(summary_table(result))
    return 0


def _verify(args: argparse.Namespace) -> int:
    key_path = args.public_key
    if key_path is None:
        key_path = DEV_PUBLIC_KEY
        print(f"WARNING: no --public-key given; trusting the development key {key_path}", file=sys.stderr)
    verified = bundle.verify_bundle(args.bundle, bundle.load_public_key(key_path))
    manifest = verified.manifest
    print(
        f"OK {args.bundle}: {manifest.model} version {manifest.version}, "
        f"{len(manifest.files)} files, signed by key {verified.key_id}"
    )
    return 0


def _interrupt(signum: int, _frame: object) -> None:
    """Turn SIGTERM into KeyboardInterrupt so half-written stage and bundle folders are removed."""
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (1 on any build or verification failure)."""
    args = _parser().parse_args(argv)
    if argv is None:  # only as a real command: tests call main() in-process
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        return _build(args) if args.command == "build" else _verify(args)
    except bundle.BundleVerificationError as exc:
        print(f"verify FAILED: {exc.path}: {exc}", file=sys.stderr)
        return 1
    except (BuildError, bundle.BundleError) as exc:
        print(f"{args.command} FAILED: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{args.command} interrupted; nothing was published", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
