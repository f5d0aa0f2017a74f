"""The bundle contract: signatures, checksums and tolerances (contract/bundle.py)."""

from pathlib import Path

import numpy as np
import pytest

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
        "files": bundle.file_entries(root, ["model.onnx", "golden/inputs.npz"]),
    }
    bundle.write_manifest(root, manifest, key)
    return root, bundle.public_path(key_path)


def test_untouched_bundle_verifies(signed_bundle: tuple[Path, Path]) -> None:
    root, pub = signed_bundle
    verified = bundle.verify_bundle(root, bundle.load_public_key(pub))
    assert verified.manifest["version"] == "abc"
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
