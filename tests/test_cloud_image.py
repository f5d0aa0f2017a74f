"""ModelImage's build context and trusted key: exactly one bundle reaches the builder, and no build
starts without the public key the image will trust."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pulumi
import pytest
from cloud_harness import make_project, mock_outputs, write_fixture_bundle

from components.aws import model_image
from components.aws.model_image import ModelImage, ModelImageArgs, stage_context


class Mocks(pulumi.runtime.Mocks):
    def __init__(self) -> None:
        self.registered: list[str] = []

    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str, dict[str, Any]]:
        self.registered.append(args.name)
        return mock_outputs(args.typ, args.name, dict(args.inputs), "us-east-1")

    def call(self, args: pulumi.runtime.MockCallArgs) -> tuple[dict[str, Any], list[tuple[str, str]]]:
        return {"userName": "AWS", "password": "unit", "proxyEndpoint": "https://x"}, []


@pytest.fixture(autouse=True)
def mocks() -> Iterator[Mocks]:
    instance = Mocks()
    pulumi.runtime.set_mocks(instance, project="dualdeploy", stack="unit", preview=False)
    yield instance


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = make_project(tmp_path / "project")
    write_fixture_bundle(root / "dist", "other")  # a second bundle that must not reach the builder
    return root


def args(project: Path, **overrides: Any) -> ModelImageArgs:
    fields: dict[str, Any] = {
        "repository_name": "dualdeploy/demo",
        "context_dir": project,
        "bundle_dir": (project / "dist" / "demo" / "latest").resolve(),
        "bundle_version": "0123456789ab",
    }
    return ModelImageArgs(**{**fields, **overrides})


def test_the_staged_context_holds_the_server_the_contract_one_bundle_and_the_key(
    project: Path, tmp_path: Path
) -> None:
    folder = stage_context(args(project), tmp_path / "context")
    top = sorted(p.name for p in folder.iterdir())
    assert top == ["bundle", "contract", "serving", "signer.pub"]
    bundle = (project / "dist" / "demo" / "latest").resolve()
    assert sorted(
        p.relative_to(folder / "bundle") for p in (folder / "bundle").rglob("*") if p.is_file()
    ) == sorted(p.relative_to(bundle) for p in bundle.rglob("*") if p.is_file())
    assert (folder / "serving" / "Dockerfile").is_file() and (folder / "contract" / "__init__.py").is_file()
    assert not list(folder.rglob("__pycache__"))
    assert (folder / "signer.pub").read_bytes() == (project / ".keys" / "dev-ed25519.pub").read_bytes()
    assert not any("other" in str(p) for p in folder.rglob("*"))


def test_restaging_replaces_what_an_earlier_build_left(project: Path, tmp_path: Path) -> None:
    folder = tmp_path / "context"
    (folder / "bundle").mkdir(parents=True)
    (folder / "bundle" / "stale.onnx").write_bytes(b"old")
    stage_context(args(project), folder)
    assert not (folder / "bundle" / "stale.onnx").exists()


def test_the_image_builds_from_the_staged_context(project: Path, mocks: Mocks) -> None:
    ModelImage("image", args(project))
    staged = project / model_image.STAGING_DIR / "image"
    assert (staged / "bundle" / "manifest.json").is_file() and (staged / "signer.pub").is_file()


def test_a_missing_key_stops_the_build_before_any_resource(project: Path, mocks: Mocks) -> None:
    (project / ".keys" / "dev-ed25519.pub").unlink()
    with pytest.raises(
        ValueError, match=re.escape("public_key: ") + r".*dev-ed25519.pub does not exist.*serving.publicKey"
    ):
        ModelImage("image", args(project))
    with pytest.raises(ValueError, match=r"release-ed25519.pub does not exist"):
        ModelImage("image", args(project, public_key=project / ".keys" / "release-ed25519.pub"))
    assert mocks.registered == []
