"""The bundle contract: signatures, checksums and tolerances (contract/bundle.py)."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from contract import bundle


@pytest.fixture
def signed_bundle(tmp_path: Path) -> tuple[Path, Path]:
    key_path = tmp_path / "keys" / "signer.pem"
    key = bundle.generate_key(key_path)
    root = tmp_path / "b"
    (root / "golden").mkdir(parents=True)
    (root / "model.onnx").write_bytes(b"not really onnx, but bytes to hash")
    bundle.save_tensors(root / "golden" / "inputs.npz", {"x": np.ones((1, 3), np.float32)})
    manifest = {
        "schema_version": bundle.SCHEMA_VERSION,
        "model": "t",
        "version": "abc",
        "task": "classification",
        "inputs": [{"name": "x", "dtype": "float32", "shape": ["batch", 3]}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": ["batch", 2]}],
        "golden": {"inputs": "golden/inputs.npz", "outputs": "golden/inputs.npz"},
        "files": bundle.file_entries(root, ["model.onnx", "golden/inputs.npz"]),
    }
    bundle.write_manifest(root, manifest, key)
    return root, bundle.public_path(key_path)


def test_untouched_bundle_verifies(signed_bundle: tuple[Path, Path]) -> None:
    root, pub = signed_bundle
    verified = bundle.verify_bundle(root, bundle.load_public_key(pub))
    assert verified.manifest.version == "abc"
    assert verified.file("model.onnx") == root / "model.onnx"


def test_tampered_file_is_named(signed_bundle: tuple[Path, Path]) -> None:
    root, pub = signed_bundle
    (root / "model.onnx").write_bytes(b"NOT really onnx, but bytes to hash")
    with pytest.raises(bundle.BundleVerificationError) as err:
        bundle.verify_bundle(root, bundle.load_public_key(pub))
    assert err.value.path == "model.onnx"


def test_tampered_manifest_fails_signature(signed_bundle: tuple[Path, Path]) -> None:
    root, pub = signed_bundle
    text = (root / "manifest.json").read_text().replace('"abc"', '"abd"')
    (root / "manifest.json").write_text(text)
    with pytest.raises(bundle.BundleVerificationError, match="signature") as err:
        bundle.verify_bundle(root, bundle.load_public_key(pub))
    assert err.value.path == "manifest.json"


def test_wrong_key_is_refused(signed_bundle: tuple[Path, Path], tmp_path: Path) -> None:
    root, _ = signed_bundle
    other = bundle.generate_key(tmp_path / "other.pem").public_key()
    with pytest.raises(bundle.BundleVerificationError, match="signature"):
        bundle.verify_bundle(root, other)


def test_stray_file_is_refused(signed_bundle: tuple[Path, Path]) -> None:
    root, pub = signed_bundle
    (root / "extra.bin").write_bytes(b"x")
    with pytest.raises(bundle.BundleVerificationError) as err:
        bundle.verify_bundle(root, bundle.load_public_key(pub))
    assert err.value.path == "extra.bin"


def test_private_key_file_is_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    bundle.generate_key(path)
    assert path.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize(
    ("tolerance", "figure"),
    [
        ({"kind": "allclose", "atol": 1e-3, "rtol": 0.0}, "max_abs_diff"),
        ({"kind": "top1", "min_agreement": 1.0}, "agreement"),
        ({"kind": "cosine", "min_cosine": 0.999}, "min_cosine"),
    ],
)
def test_compare_outputs_accepts_close_values(tolerance: dict, figure: str) -> None:
    ref = {"y": np.array([[1.0, 2.0, 3.0], [3.0, 1.0, 0.0]], np.float32)}
    got = {"y": ref["y"] + 1e-4}
    assert figure in bundle.compare_outputs(ref, got, tolerance)


def test_compare_outputs_reports_the_measured_difference() -> None:
    ref = {"y": np.zeros((2, 2), np.float32)}
    with pytest.raises(bundle.ToleranceExceeded, match=r"0\.5"):
        bundle.compare_outputs(ref, {"y": ref["y"] + 0.5}, {"kind": "allclose", "atol": 0.01, "rtol": 0})


def test_compare_outputs_checks_shapes_before_values() -> None:
    ref = {"y": np.zeros((2, 2), np.float32)}
    with pytest.raises(bundle.ShapeMismatch, match="shape"):
        bundle.compare_outputs(ref, {"y": np.zeros((2, 3), np.float32)}, {"kind": "top1", "min_agreement": 1})


# --------------------------------------------------------------------------- the manifest schema


def _resign(root: Path, key_path: Path, change: dict[str, object]) -> None:
    manifest = json.loads((root / bundle.MANIFEST_NAME).read_text())
    manifest.update(change)
    bundle.write_manifest(root, manifest, bundle.load_private_key(key_path))


def test_a_signed_manifest_that_breaks_the_schema_is_refused_naming_the_field(
    signed_bundle: tuple[Path, Path],
) -> None:
    root, pub = signed_bundle
    variant = {
        "name": "int8",
        "file": "model.onnx",
        "format": "onnx",
        "precision": "int8",
        "device_classes": ["x86_cpu"],
        "tolerance": {"kind": "closeish"},
    }
    _resign(root, pub.with_suffix(".pem"), {"variants": [variant]})
    with pytest.raises(
        bundle.BundleVerificationError, match=r"manifest.json: variants\[0\]\.tolerance\.kind"
    ):
        bundle.verify_bundle(root, bundle.load_public_key(pub))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[1, 2]", "must be a JSON object"),
        ("{" * 100_000, "not valid JSON"),
        ('{"schema_version": 9}', "schema_version 9 is not supported"),
        ('{"schema_version": 2, "model": "m"}', "version: Field required"),
    ],
)
def test_malformed_manifests_get_a_clear_error_not_a_traceback(
    tmp_path: Path, text: str, message: str
) -> None:
    (tmp_path / bundle.MANIFEST_NAME).write_text(text)
    with pytest.raises(bundle.BundleVerificationError, match=message):
        bundle.read_manifest(tmp_path)


def test_a_manifest_that_is_a_fifo_or_a_link_is_refused_without_reading_it(
    signed_bundle: tuple[Path, Path],
) -> None:
    root, pub = signed_bundle
    real = root / "real.json"
    (root / bundle.MANIFEST_NAME).rename(real)
    os.mkfifo(root / bundle.MANIFEST_NAME)
    with pytest.raises(bundle.BundleVerificationError, match="is not a regular file"):
        bundle.verify_bundle(root, bundle.load_public_key(pub))
    (root / bundle.MANIFEST_NAME).unlink()
    (root / bundle.MANIFEST_NAME).symlink_to(real)
    with pytest.raises(bundle.BundleVerificationError, match="links are refused"):
        bundle.verify_bundle(root, bundle.load_public_key(pub))


def test_the_manifest_schema_is_exported_as_json_schema() -> None:
    schema = bundle.Manifest.json_schema()
    assert {"schema_version", "model", "version", "task", "inputs", "files", "golden"} <= set(
        schema["required"]
    )
    assert "Variant" in schema["$defs"] and "Quality" in schema["$defs"]


# --------------------------------------------------------------------------- hostile bundles


def test_a_signature_that_is_a_folder_is_refused_cleanly(signed_bundle: tuple[Path, Path]) -> None:
    root, pub = signed_bundle
    (root / bundle.SIGNATURE_NAME).unlink()
    (root / bundle.SIGNATURE_NAME).mkdir()
    with pytest.raises(bundle.BundleVerificationError, match=r"manifest.json.sig: is not a regular file"):
        bundle.verify_bundle(root, bundle.load_public_key(pub))


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"model.onnx": "abc"}, r"files\.model\.onnx: Input should be a valid dictionary"),
        ({"model.onnx": {"sha256": "0" * 64}}, r"files\.model\.onnx\.size: Field required"),
        ({"model.onnx": {"sha256": "xyz", "size": 1}}, r"files\.model\.onnx\.sha256: String should match"),
        (
            {"model.onnx": {"sha256": "0" * 64, "size": -1}},
            r"files\.model\.onnx\.size: Input should be greater",
        ),
    ],
)
def test_malformed_file_entries_are_named(
    signed_bundle: tuple[Path, Path], files: dict[str, object], message: str
) -> None:
    root, pub = signed_bundle
    _resign(root, pub.with_suffix(".pem"), {"files": files})
    with pytest.raises(bundle.BundleVerificationError, match=message):
        bundle.verify_bundle(root, bundle.load_public_key(pub))


def _make_fifo(path: Path) -> None:
    os.mkfifo(path)


def _make_folder_link(path: Path) -> None:
    path.symlink_to(path.parent / "golden", target_is_directory=True)


def _make_empty_folder(path: Path) -> None:
    path.mkdir()


def _make_unlisted_folder(path: Path) -> None:
    path.mkdir()
    (path / "notes.txt").write_text("x")


@pytest.mark.parametrize(
    ("make", "name", "message"),
    [
        (_make_fifo, "pipe", "is a FIFO"),
        (_make_folder_link, "golden2", "is a symlink"),
        (_make_empty_folder, "empty", "holds no listed file"),
        (_make_unlisted_folder, "extra", "holds no listed file"),
    ],
)
def test_anything_the_manifest_does_not_list_is_refused_by_name(
    signed_bundle: tuple[Path, Path], make: object, name: str, message: str
) -> None:
    root, pub = signed_bundle
    assert callable(make)
    make(root / name)
    with pytest.raises(bundle.BundleVerificationError, match=message) as err:
        bundle.verify_bundle(root, bundle.load_public_key(pub))
    assert err.value.path == name


def test_a_listed_file_that_is_a_link_is_refused_even_inside_the_bundle(
    signed_bundle: tuple[Path, Path],
) -> None:
    root, pub = signed_bundle
    (root / "model.onnx").rename(root / "golden" / "model.onnx")
    (root / "model.onnx").symlink_to(root / "golden" / "model.onnx")
    with pytest.raises(bundle.BundleVerificationError, match="links are refused") as err:
        bundle.verify_bundle(root, bundle.load_public_key(pub))
    assert err.value.path == "model.onnx"


def test_a_listed_folder_that_is_a_link_is_refused(signed_bundle: tuple[Path, Path], tmp_path: Path) -> None:
    root, pub = signed_bundle
    (root / "golden").rename(tmp_path / "elsewhere")
    (root / "golden").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(bundle.BundleVerificationError, match="folder 'golden' is a link") as err:
        bundle.verify_bundle(root, bundle.load_public_key(pub))
    assert err.value.path == "golden/inputs.npz"


def test_a_file_swapped_after_verification_is_never_returned(signed_bundle: tuple[Path, Path]) -> None:
    root, pub = signed_bundle
    verified = bundle.verify_bundle(root, bundle.load_public_key(pub))
    assert verified.read("model.onnx") == b"not really onnx, but bytes to hash"
    # Same size, other bytes, swapped in by rename after the hash: what the server reads next is refused.
    (root / "evil").write_bytes(b"NOT really onnx, but bytes to hash")
    (root / "evil").rename(root / "model.onnx")
    with pytest.raises(bundle.BundleVerificationError, match="sha256") as err:
        verified.read("model.onnx")
    assert err.value.path == "model.onnx"
    with pytest.raises(bundle.BundleError, match="not listed"):
        verified.read("evil")


def test_latest_is_resolved_once(signed_bundle: tuple[Path, Path], tmp_path: Path) -> None:
    root, pub = signed_bundle
    latest = tmp_path / "latest"
    latest.symlink_to(root, target_is_directory=True)
    verified = bundle.verify_bundle(latest, bundle.load_public_key(pub))
    assert verified.path == root.resolve()
    # Re-pointing latest at another (unsigned) folder after verification changes nothing that is read.
    other = tmp_path / "other"
    other.mkdir()
    (other / "model.onnx").write_bytes(b"attacker")
    latest.unlink()
    latest.symlink_to(other, target_is_directory=True)
    assert verified.read("model.onnx") == b"not really onnx, but bytes to hash"
    assert verified.load_tensors("golden/inputs.npz")["x"].shape == (1, 3)


def test_a_private_copy_holds_the_checked_bytes(signed_bundle: tuple[Path, Path], tmp_path: Path) -> None:
    root, pub = signed_bundle
    verified = bundle.verify_bundle(root, bundle.load_public_key(pub))
    dest = verified.copy_to(["model.onnx", "golden/inputs.npz"], tmp_path / "private")
    assert (dest / "model.onnx").read_bytes() == (root / "model.onnx").read_bytes()
    assert (dest / "golden" / "inputs.npz").stat().st_mode & 0o777 == 0o600


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    doc=st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
        max_leaves=30,
    ),
    base=st.sampled_from(["empty", "valid"]),
)
def test_the_reader_never_fails_with_anything_but_a_named_error(doc: object, base: str) -> None:
    """Fuzz: any JSON, alone or merged over a valid manifest's keys, is a ManifestError or a Manifest."""
    valid = {
        "schema_version": bundle.SCHEMA_VERSION,
        "model": "t",
        "version": "v",
        "task": "classification",
        "inputs": [{"name": "x", "dtype": "float32", "shape": ["batch", 3]}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": ["batch", 2]}],
        "golden": {"inputs": "g.npz", "outputs": "g.npz"},
        "files": {"g.npz": {"sha256": "0" * 64, "size": 1}},
    }
    data = {**valid, **doc} if base == "valid" and isinstance(doc, dict) else doc
    try:
        parsed = bundle.Manifest.parse(json.dumps(data).encode())
    except bundle.ManifestError as exc:
        assert str(exc)
    else:
        assert parsed.model and parsed.files
