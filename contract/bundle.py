"""The bundle contract: manifest schema, checksums, ed25519 signatures, tolerances.

This module is the one piece of ``model_build`` that the server and the edge
devices import, so it depends only on the standard library, NumPy and
``cryptography``. Never import torch, onnx or anything heavy here.

A bundle is a folder::

    dist/<model>/<version>/
        manifest.json        # the manifest (schema below), canonical JSON
        manifest.json.sig    # raw 64-byte ed25519 signature over manifest.json
        model.fp32.onnx      # every other file is listed in manifest["files"]
        golden/inputs.npz
        golden/outputs.npz
        ...

The manifest's schema is :mod:`contract.manifest` (typed, validated, exported as JSON Schema);
this module reads it once, checks its signature on those bytes, and checks every listed file.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from .manifest import (  # noqa: F401 - SCHEMA_VERSION and READABLE_SCHEMA_VERSIONS are re-exported
    READABLE_SCHEMA_VERSIONS,
    SCHEMA_VERSION,
    FileEntry,
    Manifest,
    ManifestError,
    Quality,
    Variant,
)

MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.json.sig"
_CHUNK = 1 << 20


class BundleError(Exception):
    """Base class for every bundle problem a user can act on."""


class BundleVerificationError(BundleError):
    """A bundle failed a checksum, size, listing or signature check.

    Attributes:
        path: the file (relative to the bundle) that failed.
    """

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path


class ToleranceExceeded(BundleError):
    """Outputs differ from the reference by more than the tolerance allows."""


class ShapeMismatch(BundleError):
    """Output names or shapes differ from the reference."""


# --------------------------------------------------------------------------- hashing


def sha256_file(path: Path) -> str:
    """Return the hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_entries(bundle_dir: Path, relpaths: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Build the manifest's ``files`` map (sha256 and size) for ``relpaths``."""
    entries: dict[str, dict[str, Any]] = {}
    for rel in sorted(relpaths):
        path = bundle_dir / rel
        entries[rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    return entries


def canonical_json(data: Mapping[str, Any]) -> bytes:
    """Serialise a manifest deterministically: sorted keys, two-space indent, newline."""
    return (json.dumps(data, sort_keys=True, indent=2) + "\n").encode()


# --------------------------------------------------------------------------- keys


def generate_key(private_path: Path) -> Ed25519PrivateKey:
    """Generate an ed25519 key; write PEM private (0600) and ``.pub`` public files."""
    key = Ed25519PrivateKey.generate()
    private_path.parent.mkdir(parents=True, exist_ok=True)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    public_path(private_path).write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return key


def public_path(private_path: Path) -> Path:
    """The public key file that sits beside a private key file."""
    return private_path.with_suffix(".pub")


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Load a PEM ed25519 private key.

    Raises:
        BundleError: the file is missing or not an unencrypted ed25519 PEM key.
    """
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise BundleError(f"signing key {path}: cannot load ({exc})") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise BundleError(f"signing key {path}: not an ed25519 key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Load a PEM ed25519 public key.

    Raises:
        BundleError: the file is missing or not an ed25519 PEM public key.
    """
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise BundleError(f"public key {path}: cannot load ({exc})") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise BundleError(f"public key {path}: not an ed25519 key")
    return key


def key_id(public_key: Ed25519PublicKey) -> str:
    """A short, stable identifier of a public key (sha256 of its raw bytes, 16 hex)."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


# --------------------------------------------------------------------------- write / verify


def write_manifest(bundle_dir: Path, manifest: Mapping[str, Any], key: Ed25519PrivateKey) -> None:
    """Write ``manifest.json`` and its detached signature into ``bundle_dir``.

    The caller builds ``manifest["files"]`` with :func:`file_entries` first.
    """
    data = canonical_json(manifest)
    (bundle_dir / MANIFEST_NAME).write_bytes(data)
    (bundle_dir / SIGNATURE_NAME).write_bytes(key.sign(data))


MAX_MANIFEST_BYTES = 16 << 20
"""Largest ``manifest.json`` (or signature) read: far above any real one, far below a memory problem."""


def _read_small_regular_file(root: Path, name: str, missing: str = "") -> bytes:
    """Read ``root/name`` once (via :func:`_open_in`: no link, only a regular file), within the size limit.

    Raises:
        BundleVerificationError: naming ``name`` and why it was refused.
    """
    fd = _open_in(root, name, missing or f"missing in {root}")
    try:
        size = os.fstat(fd).st_size
        if size > MAX_MANIFEST_BYTES:
            raise BundleVerificationError(name, f"is {size:,} bytes, above {MAX_MANIFEST_BYTES:,}")
        with os.fdopen(fd, "rb", closefd=False) as handle:
            data = handle.read(MAX_MANIFEST_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_MANIFEST_BYTES:
        raise BundleVerificationError(name, f"grew above {MAX_MANIFEST_BYTES:,} bytes while read")
    return data


def _parse(data: bytes) -> Manifest:
    try:
        return Manifest.parse(data)
    except ManifestError as exc:
        raise BundleVerificationError(MANIFEST_NAME, str(exc)) from None


def read_manifest(bundle_dir: Path) -> Manifest:
    """Read and validate a bundle's manifest against the schema, without verifying its signature.

    For display and tooling only: anything served or deployed goes through :func:`verify_bundle`.

    Raises:
        BundleVerificationError: the manifest is missing, not a regular file, not JSON, of an unsupported
            schema version, or does not fit the schema (naming the field).
    """
    return _parse(_read_small_regular_file(Path(bundle_dir), MANIFEST_NAME))


def _open_in(root: Path, rel: str, missing: str = "listed in the manifest but missing") -> int:
    """Open ``root/rel`` for reading, refusing a link at any step and anything but a regular file.

    Each folder on the way is opened relative to the one before it with ``O_NOFOLLOW``, so neither a
    symlinked file nor a symlinked folder is followed, and a path can't be redirected between steps.

    Returns:
        The open file descriptor (the caller closes it).

    Raises:
        BundleVerificationError: naming ``rel``: missing (with ``missing`` as the reason), a link, or
            not a regular file.
    """
    parts = rel.split("/")
    if rel.startswith("/") or any(part in ("", ".", "..") for part in parts):
        raise BundleVerificationError(
            rel, "path escapes the bundle folder (absolute, empty, '.' or '..' part)"
        )
    try:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise BundleVerificationError(rel, missing) from exc
    try:
        for part in parts[:-1]:
            try:
                child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            except FileNotFoundError as exc:
                raise BundleVerificationError(rel, missing) from exc
            except OSError as exc:
                raise BundleVerificationError(rel, f"folder {part!r} is a link or not a folder") from exc
            os.close(fd)
            fd = child
        try:
            leaf = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fd)
        except FileNotFoundError as exc:
            raise BundleVerificationError(rel, missing) from exc
        except OSError as exc:
            raise BundleVerificationError(
                rel, f"cannot be opened ({exc.strerror}; links are refused)"
            ) from exc
    finally:
        os.close(fd)
    if not stat.S_ISREG(os.fstat(leaf).st_mode):
        os.close(leaf)
        raise BundleVerificationError(rel, "is not a regular file")
    return leaf


def _read_listed(root: Path, rel: str, entry: FileEntry, keep: bool) -> bytes:
    """Read a listed file once, check its size and sha256 on those bytes; return them if ``keep``.

    Never reads more than the manifest's size plus one byte, so a file that grew is refused, not read.

    Raises:
        BundleVerificationError: naming ``rel``.
    """
    fd = _open_in(root, rel)
    digest = hashlib.sha256()
    kept = bytearray()
    read = 0
    try:
        size = os.fstat(fd).st_size
        if size != entry.size:
            raise BundleVerificationError(rel, f"size {size} != manifest {entry.size}")
        while chunk := os.read(fd, min(_CHUNK, entry.size + 1 - read)):
            read += len(chunk)
            if read > entry.size:
                raise BundleVerificationError(
                    rel, f"grew beyond the manifest's {entry.size} bytes while read"
                )
            digest.update(chunk)
            if keep:
                kept += chunk
    finally:
        os.close(fd)
    if read != entry.size:
        raise BundleVerificationError(rel, f"read {read} bytes, manifest says {entry.size}")
    if digest.hexdigest() != entry.sha256:
        raise BundleVerificationError(
            rel, f"sha256 {digest.hexdigest()[:12]}… != manifest {entry.sha256[:12]}…"
        )
    return bytes(kept)


_KINDS = {
    stat.S_IFLNK: "a symlink",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


def _check_tree(root: Path, listed: set[str]) -> None:
    """Refuse anything in the bundle folder that the manifest does not account for.

    Allowed: the listed regular files, the manifest and its signature, and the folders on their paths.
    Everything else is refused by name: an unlisted file, a symlink (listed or not, to a file or a
    folder), a FIFO, a socket, a device, an unlisted or empty folder. Nothing is followed or opened.

    Raises:
        BundleVerificationError: naming the first such entry (in sorted order).
    """
    folders = {"/".join(rel.split("/")[:i]) for rel in listed for i in range(1, rel.count("/") + 1)}
    pending = [""]
    while pending:
        prefix = pending.pop()
        with os.scandir(root / prefix if prefix else root) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                rel = f"{prefix}/{entry.name}" if prefix else entry.name
                mode = entry.stat(follow_symlinks=False).st_mode
                kind = _KINDS.get(stat.S_IFMT(mode))
                if kind is not None:
                    raise BundleVerificationError(
                        rel, f"is {kind}; a bundle holds only regular files and their folders"
                    )
                if stat.S_ISDIR(mode):
                    if rel not in folders:
                        raise BundleVerificationError(
                            rel, "folder is present in the bundle but holds no listed file"
                        )
                    pending.append(rel)
                elif rel not in listed:
                    raise BundleVerificationError(rel, "present in the bundle but not in the manifest")


@dataclass(frozen=True)
class VerifiedBundle:
    """A bundle whose signature and every checksum held at verification time.

    ``path`` is the bundle folder resolved once (a ``latest`` link re-pointed later changes nothing).
    ``manifest`` was parsed from exactly ``manifest_bytes``, the bytes whose signature was checked.
    Whatever is used from the bundle is read with :meth:`read`, which checks the bytes it returns
    against the signed manifest: a file swapped after verification is refused, never used.
    """

    path: Path
    manifest: Manifest
    key_id: str
    manifest_bytes: bytes = b""

    def _entry(self, relpath: str) -> FileEntry:
        entry = self.manifest.files.get(relpath)
        if entry is None:
            raise BundleError(f"{relpath}: not listed in the manifest of {self.path}")
        return entry

    def file(self, relpath: str) -> Path:
        """Path of a listed file, for messages and tools; anything served is read with :meth:`read`."""
        self._entry(relpath)
        return self.path / relpath

    def read(self, relpath: str) -> bytes:
        """The bytes of a listed file, read once and returned only if they hash to the signed manifest.

        Raises:
            BundleError: the file is not listed.
            BundleVerificationError: it changed, became a link or went missing since verification.
        """
        return _read_listed(self.path, relpath, self._entry(relpath), keep=True)

    def load_tensors(self, relpath: str) -> dict[str, np.ndarray]:
        """A listed ``.npz`` file's arrays, from bytes checked by :meth:`read`."""
        return load_tensors(io.BytesIO(self.read(relpath)))

    def copy_to(self, relpaths: Iterable[str], dest: Path) -> Path:
        """Write checked bytes of listed files under ``dest`` (a private folder the caller owns).

        For a runtime that takes only a path (a TensorRT EP context model and its engine): it then reads
        the copy, which no one else can write, never the bundle.

        Returns:
            ``dest``.
        """
        for rel in relpaths:
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(self.read(rel))
        return dest


def verify_bundle(bundle_dir: Path, public_key: Ed25519PublicKey) -> VerifiedBundle:
    """Verify a bundle: the signature, then its folder tree, then every listed file.

    The folder is resolved once (``latest`` may be a link to a version; nothing inside may be).
    ``manifest.json`` is read once; the signature is checked on those bytes and the same bytes are
    parsed, so nothing can swap the manifest between the check and the use. Listed files are opened
    without following links and hashed as read.

    Args:
        bundle_dir: the bundle folder.
        public_key: the trusted signer's public key.

    Returns:
        The verified bundle with its parsed manifest.

    Raises:
        BundleVerificationError: naming the first file that fails.
    """
    try:
        root = Path(bundle_dir).resolve(strict=True)
    except (OSError, RuntimeError) as exc:
        raise BundleVerificationError(str(bundle_dir), f"bundle folder does not exist ({exc})") from exc
    if not root.is_dir():
        raise BundleVerificationError(str(bundle_dir), "is not a folder")
    data = _read_small_regular_file(root, MANIFEST_NAME)
    signature = _read_small_regular_file(root, SIGNATURE_NAME, missing="missing: the bundle is unsigned")
    try:
        public_key.verify(signature, data)
    except InvalidSignature as exc:
        raise BundleVerificationError(
            MANIFEST_NAME,
            f"signature does not verify with key {key_id(public_key)} "
            "(tampered manifest or wrong public key)",
        ) from exc
    manifest = _parse(data)
    for rel, entry in sorted(manifest.files.items()):
        _read_listed(root, rel, entry, keep=False)
    _check_tree(root, set(manifest.files) | {MANIFEST_NAME, SIGNATURE_NAME})
    return VerifiedBundle(path=root, manifest=manifest, key_id=key_id(public_key), manifest_bytes=data)


# --------------------------------------------------------------------------- golden data


def load_tensors(path: Path | IO[bytes]) -> dict[str, np.ndarray]:
    """Load a golden ``.npz`` file (a path or an open binary file) into a name → array dict."""
    with np.load(path, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


def save_tensors(path: Path, tensors: Mapping[str, np.ndarray]) -> None:
    """Save a name → array dict as an uncompressed ``.npz`` (deterministic bytes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as handle:
        arrays: dict[str, Any] = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
        np.savez(handle, **arrays)


# --------------------------------------------------------------------------- tolerances


def compare_outputs(
    reference: Mapping[str, np.ndarray],
    actual: Mapping[str, np.ndarray],
    tolerance: Mapping[str, Any],
) -> dict[str, float]:
    """Compare outputs: names, then shapes, then values under ``tolerance``.

    ``tolerance`` is one of::

        {"kind": "allclose", "atol": float, "rtol": float}
        {"kind": "top1", "min_agreement": float}      # classifier logits, last axis
        {"kind": "cosine", "min_cosine": float}       # embeddings, per row

    Returns:
        Measured figures: ``max_abs_diff`` always, plus ``agreement`` or
        ``min_cosine`` for those kinds.

    Raises:
        ShapeMismatch: names or shapes differ.
        ToleranceExceeded: values differ beyond the tolerance; the message
            carries the measured figure.
    """
    if set(reference) != set(actual):
        raise ShapeMismatch(f"output names {sorted(actual)} != reference {sorted(reference)}")
    for name in reference:
        if reference[name].shape != actual[name].shape:
            raise ShapeMismatch(
                f"output {name!r}: shape {tuple(actual[name].shape)} "
                f"!= reference {tuple(reference[name].shape)}"
            )
    kind = tolerance.get("kind")
    figures: dict[str, float] = {}
    for name in sorted(reference):
        ref = reference[name].astype(np.float64)
        got = actual[name].astype(np.float64)
        if not np.all(np.isfinite(got)):
            raise ToleranceExceeded(f"output {name!r}: contains NaN or Inf")
        max_abs = float(np.max(np.abs(ref - got))) if ref.size else 0.0
        figures["max_abs_diff"] = max(figures.get("max_abs_diff", 0.0), max_abs)
        if kind == "allclose":
            atol, rtol = float(tolerance["atol"]), float(tolerance["rtol"])
            if not np.allclose(got, ref, atol=atol, rtol=rtol):
                raise ToleranceExceeded(
                    f"output {name!r}: max abs diff {max_abs:.3g} exceeds atol={atol:g} rtol={rtol:g}"
                )
        elif kind == "top1":
            agreement = float(np.mean(np.argmax(ref, axis=-1) == np.argmax(got, axis=-1)))
            figures["agreement"] = min(figures.get("agreement", 1.0), agreement)
            if agreement < float(tolerance["min_agreement"]):
                raise ToleranceExceeded(
                    f"output {name!r}: top-1 agreement {agreement:.4f} "
                    f"< min_agreement {tolerance['min_agreement']}"
                )
        elif kind == "cosine":
            flat_ref = ref.reshape(-1, ref.shape[-1])
            flat_got = got.reshape(-1, got.shape[-1])
            denom = np.linalg.norm(flat_ref, axis=1) * np.linalg.norm(flat_got, axis=1)
            cos = np.sum(flat_ref * flat_got, axis=1) / np.maximum(denom, 1e-12)
            worst = float(np.min(cos))
            figures["min_cosine"] = min(figures.get("min_cosine", 1.0), worst)
            if worst < float(tolerance["min_cosine"]):
                raise ToleranceExceeded(
                    f"output {name!r}: min cosine {worst:.4f} < min_cosine {tolerance['min_cosine']}"
                )
        else:
            raise BundleError(f"tolerance kind {kind!r} is not one of allclose, top1, cosine")
    return figures


# --------------------------------------------------------------------------- the quality gate

NOISE_GENERATOR = "numpy.random.default_rng(seed).standard_normal(shape, dtype=float32)"
"""How the quality set's noise is regenerated on a device (NumPy's PCG64 stream, C order)."""


class QualityGateFailed(ToleranceExceeded):
    """A variant's outputs on the quality set differ from what the build validated."""


def noise(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    """The quality set's additive noise: ``NOISE_GENERATOR`` drawn once for the whole set."""
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def tensors_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """sha256 over the arrays in name order: name, dtype, shape, then the C-order bytes."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def save_batches(path: Path, arrays: Mapping[str, np.ndarray], batch: int) -> None:
    """Save arrays as compressed ``.npz`` members of ``batch`` rows each (``name/00000``, ...).

    A reader then decompresses one batch at a time: the quality set never sits whole in memory.
    """
    members = {
        f"{name}/{i // batch:05d}": np.ascontiguousarray(array[i : i + batch])
        for name, array in arrays.items()
        for i in range(0, len(array), batch)
    }
    with path.open("wb") as handle:
        np.savez_compressed(handle, **members)  # type: ignore[arg-type]


def first_batch_digest(arrays: Mapping[str, np.ndarray], batch: int) -> str:
    """``tensors_digest`` of the first ``batch`` rows (what ``quality.first_batch_sha256`` records)."""
    return tensors_digest({name: array[:batch] for name, array in arrays.items()})


def iter_quality_inputs(quality: Quality, open_file: Any) -> Iterator[dict[str, np.ndarray]]:
    """The quality set's inputs, one batch of ``quality.batch`` rows at a time, rebuilt and checked.

    Shipped inputs are read as they are; a regenerated set adds the contract's noise
    (:data:`NOISE_GENERATOR`, drawn batch after batch from one generator, which gives the same stream
    as one draw of the whole set) to the shipped base.

    Args:
        quality: ``manifest["quality"]``.
        open_file: maps a bundle-relative path to what ``numpy.load`` reads: a path, or a binary file
            (the server passes checked bytes: ``io.BytesIO(VerifiedBundle.read(rel))``).

    Raises:
        BundleError: a file or member is missing, or the first batch does not hash to
            ``first_batch_sha256`` (the NumPy here draws another noise stream than the build's).
    """
    spec = quality.inputs
    source = spec.file or spec.base
    if source is None:
        raise BundleError("manifest: quality.inputs must name a 'file' or a 'base'")
    batch, count = quality.batch, quality.count
    cfg = spec.noise if spec.base else None
    rng = np.random.default_rng(cfg.seed) if cfg is not None else None
    with np.load(open_file(source), allow_pickle=False) as data:
        names = sorted({member.rsplit("/", 1)[0] for member in data.files})
        for index, _start in enumerate(range(0, count, batch)):
            try:
                arrays = {name: data[f"{name}/{index:05d}"] for name in names}
            except KeyError as exc:
                raise BundleError(f"quality set: batch {index} is missing ({exc})") from exc
            if cfg is not None and rng is not None:
                if cfg.input not in arrays:
                    raise BundleError(f"manifest: quality.inputs.noise.input {cfg.input!r} is not in the set")
                drawn = rng.standard_normal(arrays[cfg.input].shape, dtype=np.float32)
                arrays[cfg.input] = arrays[cfg.input] + drawn * np.float32(cfg.std)
            if index == 0 and tensors_digest(arrays) != quality.first_batch_sha256:
                raise BundleError(
                    "quality set: the rebuilt first batch does not hash to first_batch_sha256 (NumPy "
                    f"{np.__version__} here draws another noise stream than the build's; install the "
                    "NumPy that the manifest's tools name)"
                )
            yield arrays


def _margins(logits: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 logit of each row (classifier outputs, last axis)."""
    flat = logits.reshape(-1, logits.shape[-1])
    if flat.shape[-1] < 2:
        return np.full(len(flat), np.inf)
    top2 = np.partition(flat, -2, axis=-1)[:, -2:]
    return np.asarray(top2[:, 1] - top2[:, 0])


def derive_quality_tolerance(
    build_outputs: Mapping[str, np.ndarray], cross_class_diff: float
) -> dict[str, float]:
    """The numeric tolerance of the on-device gate, from what the build measured.

    ``atol`` is twice the largest difference seen between CPU classes at build (native against
    emulated), and never below 1e-3 of the largest output magnitude: kernels that compute the same
    integers give the same floats to within float rounding. ``near_ties`` is the fraction of rows whose
    top-1 lead is within ``2 * atol``: only those can change their top-1 class without the numeric check
    failing, so while it stays under 1 %, a top-1 agreement drop of 1 point always fails the gate.
    """
    scale = max((float(np.max(np.abs(v))) for v in build_outputs.values() if v.size), default=1.0)
    atol = max(2.0 * float(cross_class_diff), 1e-3 * scale, 1e-6)
    ties = [float(np.mean(_margins(v) <= 2 * atol)) for v in build_outputs.values() if v.ndim >= 2]
    return {"atol": atol, "near_ties": max(ties, default=0.0)}


def quality_gate(
    variant: Variant,
    actual: Mapping[str, np.ndarray],
    build_outputs: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
) -> dict[str, float]:
    """The on-device quality gate: this device's outputs against the build's, and against FP32.

    Two checks, both on the whole quality set:

    1. numerically, every output within the variant's ``quality.atol`` of what the build computed for
       this variant on a validated CPU class (the checks of :func:`derive_quality_tolerance`);
    2. the variant's own tolerance (top-1 agreement or cosine) against the FP32 reference outputs.

    Returns:
        ``max_abs_diff`` to the build's outputs, ``agreement_to_build`` (classifiers), and the figures of
        check 2 (``agreement`` or ``min_cosine``, and its ``max_abs_diff`` as ``max_abs_diff_to_fp32``).

    Raises:
        QualityGateFailed: either check fails; the message carries the measured figures.
        ShapeMismatch: outputs are missing or have other shapes.
    """
    entry = variant.quality
    if entry is None:
        raise BundleError(f"variant {variant.name}: the manifest gives no quality entry")
    tolerance = variant.tolerance.as_dict()
    atol = entry.atol
    figures: dict[str, float] = {}
    if set(build_outputs) != set(actual):
        raise ShapeMismatch(f"output names {sorted(actual)} != build {sorted(build_outputs)}")
    worst = 0.0
    agreements = []
    for name in sorted(build_outputs):
        want, got = build_outputs[name].astype(np.float64), actual[name].astype(np.float64)
        if want.shape != got.shape:
            raise ShapeMismatch(f"output {name!r}: shape {got.shape} != build {want.shape}")
        worst = max(worst, float(np.max(np.abs(want - got))) if want.size else 0.0)
        if tolerance.get("kind") == "top1":
            agreements.append(float(np.mean(np.argmax(want, -1) == np.argmax(got, -1))))
    figures["max_abs_diff"] = worst
    if agreements:
        figures["agreement_to_build"] = min(agreements)
    try:
        to_fp32 = compare_outputs(reference, actual, tolerance)
    except ToleranceExceeded as exc:
        raise QualityGateFailed(
            f"{exc} on the {len(next(iter(actual.values())))}-sample quality set "
            f"(max abs diff to the build's outputs {worst:.3g}, allowed {atol:.3g})"
        ) from exc
    figures.update({k if k != "max_abs_diff" else "max_abs_diff_to_fp32": v for k, v in to_fp32.items()})
    if worst > atol:
        shown = ", ".join(f"{k} {v:.4f}" for k, v in sorted(figures.items()))
        raise QualityGateFailed(
            f"outputs differ from the build's by up to {worst:.3g} > quality.atol {atol:.3g} "
            f"on the {len(next(iter(actual.values())))}-sample quality set ({shown}): this CPU's kernels "
            "do not compute what the build validated"
        )
    return figures
