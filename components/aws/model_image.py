"""ModelImage: the serving image with the bundle baked in, pushed to its own ECR repository.

What it creates:

- an ECR repository that scans every pushed image, refuses to overwrite a tag (IMMUTABLE), and
  a lifecycle policy that expires all but the newest ``keep_images`` images;
- a ``pulumi_docker.Image`` built from ``serving/Dockerfile`` for ``linux/amd64`` (the GPU nodes'
  platform, whatever machine runs ``pulumi up``), with ``BASE=gpu`` for GPU stacks (CUDA runtime
  and onnxruntime-gpu). Its build context is a folder staged under ``build/image-context/<name>``
  that holds exactly what the Dockerfile copies: ``serving/``, ``contract/``, the one bundle as
  ``bundle/`` and the trusted public key as ``signer.pub`` (hard links where the file system
  allows). Sending the repository root would send every bundle in ``dist/`` to the builder. The
  Dockerfile copies the bundle to ``/srv/bundle`` and runs ``python -m serving --check`` on it, so
  an unverifiable bundle never becomes an image;
- no build without the key: the public key the image will trust must exist before anything is
  registered (the stack config also checks that it verifies the bundle's signature);
- registry credentials from ``aws.ecr.get_authorization_token_output``, kept secret.

The output :attr:`ModelImage.image_ref` is ``<repository>@sha256:<digest>``: Deployments pull
exactly the bytes that were pushed, and a re-push under the same tag could not change them anyway.

The tag is ``<bundle version>-<source hash>``. Tags are immutable, so a tag of the bundle
version alone would make the second build after a server change fail at push; the short hash
of the image's inputs (the Dockerfile, the server, the bundle contract, the base) changes exactly
when the image would.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pulumi
import pulumi_aws as aws
import pulumi_docker as docker

PLATFORM = "linux/amd64"
BASES = ("cpu", "gpu")
DOCKERFILE = "serving/Dockerfile"
IMAGE_SOURCES: tuple[str, ...] = ("serving", "contract", DOCKERFILE)
"""What the Dockerfile copies besides the bundle and the key: it decides the image's source hash."""
DEFAULT_PUBLIC_KEY = ".keys/dev-ed25519.pub"
"""The Dockerfile's default ``PUBLIC_KEY``: the development key that ``make build`` generates."""
STAGING_DIR = "build/image-context"
"""Where the build context is staged, under ``context_dir`` (``build/`` is git-ignored)."""
_REPOSITORY_NAME = re.compile(r"[a-z0-9]+(?:[._-][a-z0-9]+)*(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*")
_VERSION = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,100}")
_TRT_VERSION = re.compile(r"\d+(\.\d+){1,3}")


@dataclass
class ModelImageArgs:
    """Inputs of :class:`ModelImage`.

    Concrete values, not Inputs: they name files on the machine that runs ``pulumi up``.
    """

    repository_name: str
    """ECR repository, e.g. ``dualdeploy/demo``."""

    context_dir: Path
    """The project root: ``serving/``, ``contract/`` and the bundle are found there, and the build
    context is staged under its ``build/image-context/``."""

    bundle_dir: Path
    """The bundle's real folder (``dist/demo/latest`` resolved), inside ``context_dir``."""

    bundle_version: str
    """``manifest["version"]``; the image tag starts with it."""

    public_key: Path | None = None
    """The signer's public key the image trusts (None: the development key
    ``<context_dir>/.keys/dev-ed25519.pub``). It must exist: the build stops before any resource
    otherwise."""

    base: str = "gpu"
    """``gpu`` (CUDA runtime, onnxruntime-gpu) for GPU stacks, ``cpu`` otherwise."""

    tensorrt_version: str | None = None
    """TensorRT runtime the GPU image installs: the version that built the bundle's engines
    (``BundleRef.tensorrt_version``). None: no TensorRT runtime, so the server refuses the engines
    and serves the ONNX variant on the CUDA provider."""

    keep_images: int = 10
    """Images the lifecycle policy keeps; older ones expire."""

    force_delete: bool = False
    """Let ``pulumi destroy`` delete the repository with its images (default: refuse while it holds any)."""

    tags: Mapping[str, str] = field(default_factory=dict)
    """Tags for the ECR repository."""


def _inside(path: Path, root: Path, what: str) -> str:
    """``path`` relative to ``root`` as a POSIX string, or a ValueError naming ``what``."""
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        raise ValueError(
            f"{what}: {path} is outside the build context {root}; Docker can only COPY from inside it"
        ) from None


def validate(args: ModelImageArgs) -> None:
    """Check the inputs before anything is registered.

    Raises:
        ValueError: naming the input and the allowed values.
    """
    if not _REPOSITORY_NAME.fullmatch(args.repository_name) or len(args.repository_name) > 256:
        raise ValueError(
            f"repository_name: {args.repository_name!r} is not an ECR repository name "
            "(lowercase letters, digits, . _ - and / between parts)"
        )
    if not _VERSION.fullmatch(args.bundle_version):
        raise ValueError(f"bundle_version: {args.bundle_version!r} cannot be part of an image tag")
    if args.base not in BASES:
        raise ValueError(f"base: {args.base!r} is not one of {', '.join(BASES)}")
    if args.tensorrt_version is not None:
        if args.base != "gpu":
            raise ValueError("tensorrt_version: only the gpu base carries a TensorRT runtime")
        if not _TRT_VERSION.fullmatch(args.tensorrt_version):
            raise ValueError(
                f"tensorrt_version: {args.tensorrt_version!r} is not a release number such as 10.9.0.34"
            )
    if args.keep_images < 1:
        raise ValueError(f"keep_images: must be ≥ 1, got {args.keep_images}")
    if not (args.context_dir / DOCKERFILE).is_file():
        raise ValueError(f"context_dir: {args.context_dir} has no {DOCKERFILE}")
    _inside(args.bundle_dir, args.context_dir, "bundle_dir")
    if not (args.bundle_dir / "manifest.json").is_file():
        raise ValueError(f"bundle_dir: {args.bundle_dir} holds no manifest.json")
    _validate_sources(args)


def _validate_sources(args: ModelImageArgs) -> None:
    """What the staged context copies must exist: the server, the contract and the trusted key."""
    for source in ("serving", "contract"):
        if not (args.context_dir / source).is_dir():
            raise ValueError(f"context_dir: {args.context_dir} has no {source}/ (the image copies it)")
    key = public_key_path(args)
    if args.public_key is not None:
        _inside(args.public_key, args.context_dir, "public_key")
    if not key.is_file():
        raise ValueError(
            f"public_key: {key} does not exist, and the image must trust the key that signed the "
            "bundle. Set dualdeploy:serving.publicKey to the signer's public key (CI: the prebuild "
            "writes .keys/release-ed25519.pub from vars.DUALDEPLOY_PUBLIC_KEY), or build the bundle "
            "with `make build`, which writes the development key .keys/dev-ed25519.pub"
        )


def public_key_path(args: ModelImageArgs) -> Path:
    """The public key the image will trust: ``public_key``, or the development key."""
    return args.public_key if args.public_key is not None else args.context_dir / DEFAULT_PUBLIC_KEY


def _place(source: Path, target: Path) -> None:
    """Hard-link ``source`` at ``target`` (copy across file systems)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def stage_context(args: ModelImageArgs, folder: Path) -> Path:
    """Write the build context into ``folder`` (emptied first) and return it.

    It holds ``serving/`` and ``contract/`` (without caches), ``bundle/`` (the one bundle) and
    ``signer.pub``: exactly what ``serving/Dockerfile`` copies, so nothing else reaches the builder.
    """
    if folder.exists():
        shutil.rmtree(folder)
    for source in ("serving", "contract"):
        root = (args.context_dir / source).resolve()
        for path in sorted(root.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                _place(path, folder / source / path.relative_to(root))
    bundle = args.bundle_dir.resolve()
    for path in sorted(bundle.rglob("*")):
        if path.is_file():
            _place(path, folder / "bundle" / path.relative_to(bundle))
    _place(public_key_path(args).resolve(), folder / "signer.pub")
    return folder


def source_hash(context_dir: Path, base: str, sources: Sequence[str] = IMAGE_SOURCES) -> str:
    """A short hash of the files the image is built from (the bundle has its own version).

    Caches and bytecode are left out: they differ between machines without changing the image.
    """
    digest = hashlib.sha256(base.encode())
    for name in sources:
        root = context_dir / name
        files = sorted(p for p in (root.rglob("*") if root.is_dir() else [root]) if p.is_file())
        for path in files:
            if "__pycache__" in path.parts or path.suffix == ".pyc":
                continue
            digest.update(path.relative_to(context_dir).as_posix().encode() + b"\0")
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:12]


def image_tag(args: ModelImageArgs) -> str:
    """``<bundle version>-<source hash>``: new whenever the bundle or the server changes."""
    return f"{args.bundle_version}-{source_hash(args.context_dir, args.base)}"


def lifecycle_policy(keep: int) -> str:
    """ECR lifecycle policy text: expire every image beyond the newest ``keep``."""
    return json.dumps(
        {
            "rules": [
                {
                    "rulePriority": 1,
                    "description": f"keep the newest {keep} images",
                    "selection": {"tagStatus": "any", "countType": "imageCountMoreThan", "countNumber": keep},
                    "action": {"type": "expire"},
                }
            ]
        }
    )


class ModelImage(pulumi.ComponentResource):
    """An ECR repository and the serving image built, pushed and referenced by digest."""

    repository_url: pulumi.Output[str]
    image_ref: pulumi.Output[str]
    tag: str

    def __init__(self, name: str, args: ModelImageArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        """Create the repository and the image.

        Raises:
            ValueError: an input is out of its allowed values (named in the message).
        """
        validate(args)
        super().__init__("dualdeploy:model_image:ModelImage", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)

        repository = aws.ecr.Repository(
            f"{name}-repo",
            name=args.repository_name,
            image_scanning_configuration=aws.ecr.RepositoryImageScanningConfigurationArgs(scan_on_push=True),
            image_tag_mutability="IMMUTABLE",
            force_delete=args.force_delete,
            encryption_configurations=[
                aws.ecr.RepositoryEncryptionConfigurationArgs(encryption_type="AES256")
            ],
            tags=dict(args.tags),
            opts=child,
        )
        aws.ecr.LifecyclePolicy(
            f"{name}-lifecycle",
            repository=repository.name,
            policy=lifecycle_policy(args.keep_images),
            opts=child,
        )

        token = aws.ecr.get_authorization_token_output(registry_id=repository.registry_id)
        self.tag = image_tag(args)
        build_args = {"BASE": args.base, "BUNDLE": "bundle", "PUBLIC_KEY": "signer.pub"}
        if args.tensorrt_version is not None:
            build_args["TENSORRT_VERSION"] = args.tensorrt_version
        context = stage_context(args, args.context_dir / STAGING_DIR / name)
        image = docker.Image(
            f"{name}-image",
            image_name=repository.repository_url.apply(lambda url: f"{url}:{self.tag}"),
            build=docker.DockerBuildArgs(
                # Relative to the program's folder, so the state does not record this machine's paths.
                context=os.path.relpath(context),
                dockerfile=os.path.relpath(context / DOCKERFILE),
                platform=PLATFORM,
                # serving/Dockerfile bind-mounts the context in a RUN step (the optional wheelhouse).
                builder_version=docker.BuilderVersion.BUILDER_BUILD_KIT,
                args=build_args,
            ),
            registry=docker.RegistryArgs(
                server=repository.repository_url,
                username=pulumi.Output.secret(token.user_name),
                password=pulumi.Output.secret(token.password),
            ),
            opts=child,
        )

        self.repository_url = repository.repository_url
        # repo_digest is "<repository>@sha256:<digest>" of what was pushed.
        self.image_ref = image.repo_digest
        self.register_outputs({"repository_url": self.repository_url, "image_ref": self.image_ref})
