"""Render a stack's Kubernetes objects offline: ``make render STACK=cloud-prod``.

Writes every object the model service of ``STACK`` would create into
``build/manifests/<stack>/`` (one YAML file each), using the same spec functions as the
components (``components/k8s_specs.py``). Values that only a real ``pulumi up`` knows (the
AWS account, the image digest pushed to ECR) are placeholders, listed in the
``dualdeploy.io/placeholders`` annotation of each object and in ``PLACEHOLDERS.txt``.

The folder is written whole or not at all: the objects go to a temporary folder beside it,
which then replaces the old one.

Not rendered: the cluster add-ons (the NVIDIA device plugin, the cluster autoscaler,
kube-prometheus-stack and prometheus-adapter are Helm charts, which cannot be fetched here); the
values the service's charts get (kube-prometheus-stack, prometheus-adapter's rules, the DCGM
exporter) are written under ``values/``. The notes end with the capacity arithmetic: model pods
per GPU node of each pool, and what the pools hold against the HPA maximum.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from components import k8s_specs, model_service
from components.model_service import ModelServiceArgs
from deploy.config import (
    ConfigError,
    MissingEngines,
    StackConfig,
    capacity_report,
    parse_stack_config,
    raw_from_stack_yaml,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
PLACEHOLDER_ACCOUNT = "000000000000"
PLACEHOLDER_DIGEST = "sha256:" + "0" * 64


class RenderError(Exception):
    """The stack cannot be rendered (no cloud part, bad config); the message says why."""


def service_args(cfg: StackConfig, image: str) -> ModelServiceArgs:
    """The model service's Args for a parsed stack, with the placeholder image: what the component gets.

    Raises:
        RenderError: the stack has no cloud part, or the service Args are invalid.
    """
    if cfg.service is None:
        raise RenderError(f"stack {cfg.stack} has no cloud part (dualdeploy:cluster): nothing to render")
    args = dataclasses.replace(cfg.service, image=image)
    if args.authenticated:
        # The hybrid teacher's keys and tokens exist only in the stack's state (ServingIdentity).
        unknown = k8s_specs.SET_BY_PULUMI
        args = dataclasses.replace(args, credentials=model_service.ServingCredentials(*[unknown] * 5))
    if args.static_ingress:
        args = dataclasses.replace(args, eip_allocation_ids=[k8s_specs.SET_BY_PULUMI])
    try:
        model_service.validate(args)
    except ValueError as exc:
        raise RenderError(f"invalid model service: {exc}") from None
    return args


def mark_placeholders(obj: dict[str, Any], placeholders: Sequence[str]) -> dict[str, Any]:
    """The object with the ``dualdeploy.io/placeholders`` annotation that lists what is a placeholder."""
    metadata = obj["metadata"]
    metadata["annotations"] = {
        **metadata.get("annotations", {}),
        k8s_specs.PLACEHOLDER_ANNOTATION: ", ".join(placeholders),
    }
    return obj


@dataclass(frozen=True)
class LoadedStack:
    """A stack config parsed for rendering, with what to tell the reader about it."""

    config: StackConfig
    notes: list[str]
    """Lines to print and write into PLACEHOLDERS.txt."""
    engines_missing: bool = False
    """The bundle lacks engines the stack requires: rendered with every pool architecture."""


def load_stack(stack: str, base_dir: Path) -> LoadedStack:
    """Parse a stack file for rendering.

    A stack that requires TensorRT engines still renders when the bundle lacks them (a bundle
    built without a GPU): the engine rule is relaxed here, loudly, because ``pulumi up`` itself
    keeps enforcing it.

    Returns:
        The config, the notes to print (and write into PLACEHOLDERS.txt), and whether engines are missing.

    Raises:
        RenderError: the stack file is missing or invalid for any other reason.
    """
    path = REPO_ROOT / "stacks" / f"Pulumi.{stack}.yaml"
    if not path.is_file():
        known = sorted(
            p.name.removeprefix("Pulumi.").removesuffix(".yaml") for p in path.parent.glob("Pulumi.*.yaml")
        )
        raise RenderError(f"no stack file {path.relative_to(REPO_ROOT)} (stacks: {', '.join(known)})")
    raw, region = raw_from_stack_yaml(yaml.safe_load(path.read_text())["config"])
    notes: list[str] = []
    engines_missing = False
    try:
        cfg = parse_stack_config(raw, stack=stack, region=region, base_dir=base_dir)
    except MissingEngines as exc:
        try:
            cfg = parse_stack_config(
                {**raw, "requireEngines": False}, stack=stack, region=region, base_dir=base_dir
            )
        except ConfigError as again:
            raise RenderError(f"invalid stack config: {again}") from None
        engines_missing = True
        notes.append(
            f"gpu-arches: the bundle lacks engines that the stack requires ({exc.key}); rendered with every "
            "pool architecture. `pulumi up` would stop here."
        )
    except ConfigError as exc:
        raise RenderError(f"invalid stack config: {exc}") from None
    notes.extend(cfg.warnings)
    if cfg.cluster is not None and cfg.service is not None:
        notes.extend(f"capacity: {line}" for line in capacity_report(cfg.cluster, cfg.service))
    return LoadedStack(cfg, notes, engines_missing)


def render(stack: str, out_dir: Path, base_dir: Path = REPO_ROOT) -> list[Path]:
    """Write the stack's objects into ``out_dir`` (replaced whole).

    Returns:
        The files written, in apply order.

    Raises:
        RenderError: the stack cannot be rendered.
    """
    loaded = load_stack(stack, base_dir)
    cfg, notes = loaded.config, loaded.notes
    if cfg.bundle is None or cfg.service is None:
        raise RenderError(f"stack {stack} has no cloud part (dualdeploy:cluster): nothing to render")
    registry = f"{PLACEHOLDER_ACCOUNT}.dkr.ecr.{cfg.region}.amazonaws.com"
    image = f"{registry}/dualdeploy/{cfg.bundle.model}@{PLACEHOLDER_DIGEST}"
    placeholders: tuple[str, ...] = ("image (account and digest are known after pulumi up pushes the image)",)
    if loaded.engines_missing:
        placeholders += ("gpu-arches (bundle lacks the required engines)",)
    args = service_args(cfg, image)
    if args.authenticated:
        placeholders += (
            f"credentials (the {k8s_specs.auth_secret_name(args)} Secret's values and the pods' "
            f"{k8s_specs.CREDENTIALS_ANNOTATION}: keys and tokens made by pulumi up, kept in its state)",
        )
    if args.static_ingress:
        placeholders += ("NLB Elastic IP allocations (allocated by pulumi up)",)
    objects = [mark_placeholders(obj, placeholders) for obj in k8s_specs.all_objects(args)]

    out_dir = out_dir.resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    written: list[Path] = []
    try:
        for index, obj in enumerate(objects):
            name = f"{index:02d}-{obj['kind'].lower()}-{obj['metadata']['name']}.yaml"
            (staging / name).write_text(yaml.safe_dump(obj, sort_keys=False))
            written.append(out_dir / name)
        (staging / "values").mkdir()
        if args.prometheus_operator:
            (staging / "values" / "kube-prometheus-stack.yaml").write_text(
                yaml.safe_dump(model_service.prometheus_stack_values(args), sort_keys=False)
            )
        if k8s_specs.queue_metric(args) is not None and args.prometheus_adapter:
            values = model_service.prometheus_adapter_values(args)
            (staging / "values" / "prometheus-adapter.yaml").write_text(
                yaml.safe_dump(values, sort_keys=False)
            )
        if args.dcgm_exporter:
            (staging / "values" / "dcgm-exporter.yaml").write_text(
                yaml.safe_dump(model_service.dcgm_exporter_values(args), sort_keys=False)
            )
        lines = [f"Rendered offline for stack {stack}; these values are placeholders:", *placeholders]
        lines += ["", "Notes:", *notes] if notes else []
        (staging / "PLACEHOLDERS.txt").write_text("\n".join(lines) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return written


def main(argv: list[str] | None = None) -> int:
    """CLI: ``python -m deploy.render STACK [--out DIR]``."""
    parser = argparse.ArgumentParser(description="Render a stack's Kubernetes objects offline.")
    parser.add_argument("stack", help="stack name (stacks/Pulumi.<stack>.yaml)")
    parser.add_argument("--out", type=Path, help="output folder (default build/manifests/<stack>)")
    parser.add_argument(
        "--project-dir", type=Path, default=Path.cwd(), help="folder the stack's bundle paths start from"
    )
    args = parser.parse_args(argv)
    out = args.out or Path("build") / "manifests" / args.stack
    try:
        files = render(args.stack, out, args.project_dir)
    except RenderError as exc:
        print(f"render: {exc}", file=sys.stderr)
        return 1
    notes = (out / "PLACEHOLDERS.txt").read_text()
    print(f"wrote {len(files)} objects to {out}/")
    print(notes, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
