"""Cascade calibration at prebuild (issue 13, item 1): the sweep, the spec's checks, the manifest's schema,
and the demo-distilled bundle that ``make bundles`` builds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from contract import bundle
from contract.manifest import Cascade, Manifest, ManifestError, confidence
from model_build.cascade import recorded_points, sweep, wilson_lower
from model_build.errors import SpecError
from model_build.pipeline import compute_keys
from model_build.spec import load_spec

REPO = Path(__file__).resolve().parents[1]


def _logits(probs: list[list[float]]) -> np.ndarray:
    return np.log(np.asarray(probs, dtype=np.float64)).astype(np.float32)


def test_margin_and_max_softmax_are_computed_on_softmax_probabilities() -> None:
    logits = _logits([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25]])
    np.testing.assert_allclose(confidence(logits, "margin"), [0.5, 0.05], rtol=1e-5)
    np.testing.assert_allclose(confidence(logits, "max_softmax"), [0.7, 0.4], rtol=1e-5)
    with pytest.raises(ValueError, match="unknown confidence measure 'entropy'"):
        confidence(logits, "entropy")


def test_sweep_picks_the_smallest_escalation_meeting_the_target() -> None:
    # Ten rows; the student disagrees with the teacher on the two least confident and on one confident row.
    margins = [0.01, 0.02, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95]
    student = _logits([[0.5 + m / 2, 0.5 - m / 2 - 1e-6, 1e-6] for m in margins])
    teacher_top = [1, 1, 0, 0, 0, 0, 0, 1, 0, 0]  # rows 0, 1, 7 disagree
    teacher = np.eye(3, dtype=np.float32)[teacher_top] * 5
    chosen, curve = sweep(student, teacher, "margin", target=0.9)
    # Escalating rows 0 and 1 fixes two of the three disagreements: 9 / 10 agree.
    assert chosen["escalation_rate"] == pytest.approx(0.2)
    assert chosen["agreement"] == pytest.approx(0.9)
    assert chosen["student_agreement"] == pytest.approx(0.7)
    conf = confidence(student, "margin")
    assert list(np.flatnonzero(conf < chosen["threshold"])) == [0, 1]
    # The curve is monotone and ends with everything escalated and full agreement.
    assert [p["escalation_rate"] for p in curve] == sorted(p["escalation_rate"] for p in curve)
    assert curve[0]["escalation_rate"] == 0.0 and curve[0]["agreement"] == pytest.approx(0.7)
    assert curve[-1]["escalation_rate"] == 1.0 and curve[-1]["agreement"] == 1.0
    assert (conf < curve[-1]["threshold"]).all()
    # Full agreement needs the confident disagreement (row 7, the 8th least confident) escalated too.
    assert sweep(student, teacher, "margin", target=1.0)[0]["escalation_rate"] == pytest.approx(0.8)
    points = recorded_points(curve)
    assert points[0]["escalation_rate"] == 0.0 and points[-1]["escalation_rate"] == 1.0


def test_with_a_confidence_level_the_lower_bound_must_reach_the_target() -> None:
    # 2048 rows, 17 disagreements at the lowest margins, spread over the first 5 %.
    rng = np.random.default_rng(0)
    n = 2048
    margins = np.sort(rng.uniform(0.0, 1.0, n))
    student = _logits([[0.5 + m / 2, 0.5 - m / 2 - 1e-6, 1e-6] for m in margins])
    disagree = np.zeros(n, bool)
    disagree[np.linspace(0, 100, 17).astype(int)] = True
    teacher = np.eye(3, dtype=np.float32)[np.where(disagree, 1, 0)]
    point, _ = sweep(student, teacher, "margin", target=0.998)
    bounded, _ = sweep(student, teacher, "margin", target=0.998, level=0.95)
    # The point estimate tolerates 4 disagreements (99.80 %); the 95 % bound only 0 (lower bound 99.87 %).
    assert point["agreement"] == pytest.approx(1 - 4 / n)
    assert bounded["agreement"] == 1.0 and bounded["agreement_lower_bound"] >= 0.998
    assert bounded["escalation_rate"] > point["escalation_rate"]
    assert wilson_lower(n, n, 0.95) == pytest.approx(n / (n + 1.6448536**2), rel=1e-6)
    assert wilson_lower(n - 1, n, 0.95) < 0.998 < wilson_lower(n - 1, n, 0.0)


def test_sweep_never_splits_tied_confidences() -> None:
    student = _logits([[0.6, 0.3, 0.1]] * 4)
    teacher = np.eye(3, dtype=np.float32)[[1, 0, 0, 0]]
    chosen, curve = sweep(student, teacher, "margin", target=0.8)
    assert [p["escalation_rate"] for p in curve] == [0.0, 1.0]
    assert chosen["escalation_rate"] == 1.0


def _distilled(tmp_path: Path, **changes: Any) -> Path:
    data = yaml.safe_load((REPO / "models" / "demo-distilled.yaml").read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    for name in ("demo.yaml", "demo_teacher.npz"):
        (tmp_path / name).write_bytes((REPO / "models" / name).read_bytes())
    path = tmp_path / "distilled.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_cascade_on_a_model_without_class_output_is_an_error_naming_the_key(tmp_path: Path) -> None:
    data = yaml.safe_load((REPO / "models" / "minilm.yaml").read_text())
    data["cascade"] = {"teacher": "minilm.yaml"}
    path = tmp_path / "minilm.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(SpecError, match=r"key 'cascade': task 'embedding' has no class output") as err:
        load_spec(path)
    assert err.value.key == "cascade"
    assert load_spec(REPO / "models" / "minilm.yaml").cascade is None


@pytest.mark.parametrize(
    ("cascade", "key", "message"),
    [
        ({"teacher": "demo.yaml", "target_agreement": 1.5}, "cascade.target_agreement", "must be in"),
        ({"teacher": "nowhere.yaml"}, "cascade.teacher", "does not exist"),
        ({"teacher": "demo.yaml", "measure": "entropy"}, "cascade.measure", "is not one of"),
        ({"teacher": "demo.yaml", "confidence_level": 1.0}, "cascade.confidence_level", "must be in"),
        ({"teacher": "demo.yaml", "treshold": 0.1}, "cascade.treshold", "unknown key"),
    ],
)
def test_bad_cascade_settings_name_the_key(
    tmp_path: Path, cascade: dict[str, Any], key: str, message: str
) -> None:
    with pytest.raises(SpecError, match=message) as err:
        load_spec(_distilled(tmp_path, cascade=cascade))
    assert err.value.key == key


def test_cascade_needs_a_distilled_student(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="needs a distil section") as err:
        load_spec(_distilled(tmp_path, distil=None))
    assert err.value.key == "cascade"


def test_a_teacher_spec_for_another_model_is_refused(tmp_path: Path) -> None:
    path = _distilled(tmp_path)
    teacher = yaml.safe_load((tmp_path / "demo.yaml").read_text())
    teacher["evaluation"] = {"samples": 64, "seed": 9}
    (tmp_path / "demo.yaml").write_text(yaml.safe_dump(teacher))
    with pytest.raises(SpecError, match="loads another model than this spec") as err:
        compute_keys(load_spec(path), {})
    assert err.value.key == "cascade.teacher"


def _manifest(**extra: Any) -> dict[str, Any]:
    return {
        "schema_version": 3,
        "model": "m",
        "version": "v1",
        "task": "classification",
        "inputs": [{"name": "x", "dtype": "float32", "shape": ["batch", 4]}],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", 3]}],
        "files": {"model.onnx": {"sha256": "0" * 64, "size": 1}},
        "golden": {"inputs": "golden/inputs.npz", "outputs": "golden/outputs.npz"},
        **extra,
    }


CASCADE = {
    "measure": "margin",
    "output": "logits",
    "threshold": 0.07,
    "target_agreement": 0.998,
    "expected_escalation_rate": 0.017,
    "expected_agreement": 0.998,
    "student_agreement": 0.992,
    "samples": 2048,
    "seed": 3,
    "teacher": {"model": "demo", "version": "69948c761c09"},
}


def test_older_manifests_still_parse_and_have_no_cascade() -> None:
    assert Manifest.parse(_manifest()).cascade is None
    assert bundle.SCHEMA_VERSION >= 4 and 3 in bundle.READABLE_SCHEMA_VERSIONS


def test_the_manifest_cascade_is_typed_and_checked() -> None:
    cascade = Manifest.parse(_manifest(schema_version=4, cascade=CASCADE)).cascade
    assert isinstance(cascade, Cascade) and cascade.teacher.version == "69948c761c09"
    with pytest.raises(ManifestError, match=r"cascade\.output: 'probs' is not an output"):
        Manifest.parse(_manifest(schema_version=4, cascade={**CASCADE, "output": "probs"}))
    with pytest.raises(ManifestError, match="a embedding bundle has no class output"):
        Manifest.parse(_manifest(schema_version=4, task="embedding", cascade=CASCADE))
    with pytest.raises(ManifestError, match=r"cascade.expected_escalation_rate"):
        Manifest.parse(_manifest(schema_version=4, cascade={**CASCADE, "expected_escalation_rate": 2}))


@pytest.mark.slow  # reads the bundles make bundles builds
def test_the_built_distilled_bundle_records_its_calibrated_cascade() -> None:
    student, teacher = REPO / "dist" / "demo-distilled" / "latest", REPO / "dist" / "demo" / "latest"
    assert (student / "manifest.json").is_file(), f"{student} is not built: run make bundles"
    manifest = bundle.read_manifest(student)
    cascade = manifest.cascade
    assert cascade is not None and cascade.measure == "margin" and cascade.output == "logits"
    assert cascade.expected_agreement >= cascade.target_agreement == 0.998
    assert cascade.confidence_level == 0.95 and cascade.agreement_lower_bound is not None
    assert cascade.agreement_lower_bound >= cascade.target_agreement
    assert cascade.student_agreement < cascade.expected_agreement
    assert 0.0 < cascade.expected_escalation_rate <= 0.1
    # The teacher it names is the demo bundle built from models/demo.yaml by the same build.
    spec = load_spec(REPO / "models" / "demo-distilled.yaml")
    keys = compute_keys(load_spec(REPO / "models" / "demo.yaml"), _trt_env())
    assert cascade.teacher.model == "demo" and cascade.teacher.version == keys.version
    assert compute_keys(spec, _trt_env()).teacher == {"model": "demo", "version": keys.version}
    assert json.loads((teacher / "manifest.json").read_text())["version"] == keys.version
    for name in ("demo", "minilm"):
        assert bundle.read_manifest(REPO / "dist" / name / "latest").cascade is None


def _trt_env() -> dict[str, Any]:
    from model_build.tensorrt import detect_environment

    return dict(detect_environment().__dict__)
