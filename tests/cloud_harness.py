"""Run the Pulumi program for one stack under mocks and write its resource graph as JSON.

Used by the cloud tests (one subprocess per stack) and by ``bench/cloud_bench.py``::

    python tests/cloud_harness.py cloud-prod --project-dir /tmp/proj --out graph.json

Why a subprocess per stack: the Pulumi runtime keeps process-wide state (the settings
object, the root Stack resource in a ContextVar, the config map, the outputs still being
awaited). ``set_mocks`` replaces the settings but keeps an existing root Stack, so a second
program run in the same process would attach its resources to the first run's stack unless
the test resets ``ROOT`` through ``pulumi.runtime.settings.reset_options`` first and clears
the config map. That works, but every reset reaches into runtime internals that change
between Pulumi releases; a fresh interpreter per stack is simple and cannot leak state.

The program runs from ``--project-dir`` (the stack's relative paths such as
``dist/demo/latest`` resolve there), so tests point it at fixture bundles in ``tmp_path``.

The mocks return what AWS and Kubernetes would: ARNs in the account 123456789012, an EKS
endpoint and certificate, an OIDC issuer, ASG names for node groups. IDs derive from a hash
of the resource's type and name, so the graph is deterministic and snapshots are stable.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import runpy
import sys
import time
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script: components/ and model_build/ live at the root
    sys.path.insert(0, str(REPO_ROOT))
ACCOUNT = "123456789012"
SECRET_SIG = "1b47061264138c4ac30d75fd1eb44270"  # pulumi.runtime.rpc._special_secret_sig
SIG_KEY = "4dabf18193072939515e22adb298388d"  # pulumi.runtime.rpc._special_sig_key
SECRET_MASK = "[secret]"


def _hex(*parts: str, length: int = 17) -> str:
    return hashlib.sha256("/".join(parts).encode()).hexdigest()[:length]


def is_secret(value: Any) -> bool:
    """True for a value the Pulumi wire format marks as secret."""
    return isinstance(value, dict) and value.get(SIG_KEY) == SECRET_SIG


def stack_config(
    stack: str, secrets: dict[str, str] | None = None, overrides: dict[str, str] | None = None
) -> tuple[dict[str, str], list[str]]:
    """Read ``stacks/Pulumi.<stack>.yaml`` into the engine's config form.

    Returns:
        ``{"ns:key": value}`` with objects and booleans as JSON text (as the CLI passes
        them), and the list of secret keys. ``secrets`` supplies plaintext for ``secure:``
        values, which cannot be decrypted here; ``overrides`` adds or replaces keys (as
        ``pulumi config set`` would).
    """
    data = yaml.safe_load((REPO_ROOT / "stacks" / f"Pulumi.{stack}.yaml").read_text())
    config: dict[str, str] = {}
    secret_keys: list[str] = []
    for key, value in (data.get("config") or {}).items():
        if isinstance(value, dict) and "secure" in value:
            continue
        config[key] = value if isinstance(value, str) else json.dumps(value)
    for key, value in (secrets or {}).items():
        config[key] = value
        secret_keys.append(key)
    config.update(overrides or {})
    return config, secret_keys


def _pem(label: str, body: str) -> str:
    return f"-----BEGIN {label}-----\n{body}\n-----END {label}-----\n"


def _mock_credentials(typ: str, name: str, inputs: dict[str, Any]) -> dict[str, Any] | None:
    """What the tls and random providers report (PEM blocks and a random string), else None."""
    body = f"MOCK{_hex(typ, name, length=32)}"
    if typ == "tls:index/privateKey:PrivateKey":
        return {"privateKeyPem": _pem("EC PRIVATE KEY", body), "publicKeyPem": _pem("PUBLIC KEY", body)}
    if typ == "tls:index/certRequest:CertRequest":
        return {"certRequestPem": _pem("CERTIFICATE REQUEST", body)}
    if typ in ("tls:index/selfSignedCert:SelfSignedCert", "tls:index/locallySignedCert:LocallySignedCert"):
        return {"certPem": _pem("CERTIFICATE", body)}
    if typ == "random:index/randomPassword:RandomPassword":
        return {"result": _hex(typ, name, length=int(inputs.get("length", 16)))}
    return None


def mock_outputs(typ: str, name: str, inputs: dict[str, Any], region: str) -> tuple[str, dict[str, Any]]:
    """Realistic outputs for each resource type the program creates."""
    credentials = _mock_credentials(typ, name, inputs)
    if credentials is not None:
        return f"{name}-{_hex(typ, name)[:8]}", {**inputs, **credentials}
    h = _hex(typ, name)
    arn = f"arn:aws:{{svc}}:{region}:{ACCOUNT}:{{res}}"
    out: dict[str, Any] = {}
    rid = f"{name}-{h[:8]}"
    if typ == "aws:eks/cluster:Cluster":
        cluster = inputs.get("name", name)
        rid = cluster
        cert = base64.b64encode(
            f"-----BEGIN CERTIFICATE-----\nMOCK{h}\n-----END CERTIFICATE-----\n".encode()
        ).decode()
        out = {
            "arn": arn.format(svc="eks", res=f"cluster/{cluster}"),
            "endpoint": f"https://{h.upper()[:32]}.gr7.{region}.eks.amazonaws.com",
            "certificateAuthority": {"data": cert},
            "identities": [
                {"oidcs": [{"issuer": f"https://oidc.eks.{region}.amazonaws.com/id/{h.upper()[:32]}"}]}
            ],
            "status": "ACTIVE",
            "platformVersion": "eks.1",
        }
    elif typ == "aws:eks/nodeGroup:NodeGroup":
        group = inputs.get("nodeGroupName", name)
        rid = f"{inputs.get('clusterName')}:{group}"
        out = {
            "arn": arn.format(svc="eks", res=f"nodegroup/{inputs.get('clusterName')}/{group}/{h[:8]}"),
            "resources": [
                {"autoscalingGroups": [{"name": f"eks-{group}-{h[:8]}"}], "remoteAccessSecurityGroupId": ""}
            ],
            "status": "ACTIVE",
        }
    elif typ == "aws:iam/role:Role":
        role = f"{name}-{h[:7]}"
        rid = role
        out = {"arn": f"arn:aws:iam::{ACCOUNT}:role/{role}", "name": role, "uniqueId": f"AROA{h.upper()}"}
    elif typ == "aws:iam/openIdConnectProvider:OpenIdConnectProvider":
        url = str(inputs.get("url", "")).removeprefix("https://")
        out = {"arn": f"arn:aws:iam::{ACCOUNT}:oidc-provider/{url}"}
        rid = out["arn"]
    elif typ == "aws:kms/key:Key":
        key_id = f"{h[:8]}-{h[8:12]}-4{h[12:15]}-a{h[:3]}-{h[3:15]}"
        rid = key_id
        out = {"arn": arn.format(svc="kms", res=f"key/{key_id}"), "keyId": key_id}
    elif typ == "aws:cloudwatch/logGroup:LogGroup":
        out = {"arn": arn.format(svc="logs", res=f"log-group:{inputs.get('name')}")}
    elif typ.startswith("aws:ec2/"):
        prefix = {
            "aws:ec2/vpc:Vpc": "vpc",
            "aws:ec2/subnet:Subnet": "subnet",
            "aws:ec2/internetGateway:InternetGateway": "igw",
            "aws:ec2/eip:Eip": "eipalloc",
            "aws:ec2/natGateway:NatGateway": "nat",
            "aws:ec2/routeTable:RouteTable": "rtb",
            "aws:ec2/routeTableAssociation:RouteTableAssociation": "rtbassoc",
            "aws:ec2/defaultSecurityGroup:DefaultSecurityGroup": "sg",
        }.get(typ, "ec2")
        rid = f"{prefix}-{h}"
        out = {"arn": arn.format(svc="ec2", res=f"{prefix}/{rid}")}
        if prefix == "eipalloc":
            out["publicIp"] = f"198.51.100.{int(h[:2], 16) % 250 + 1}"
            out["allocationId"] = rid
    elif typ == "aws:ecr/repository:Repository":
        repo = str(inputs.get("name", name))
        rid = repo
        out = {
            "arn": arn.format(svc="ecr", res=f"repository/{repo}"),
            "registryId": ACCOUNT,
            "repositoryUrl": f"{ACCOUNT}.dkr.ecr.{region}.amazonaws.com/{repo}",
        }
    elif typ == "docker:index/image:Image":
        # What the provider reports after a push: the reference by the registry's digest.
        image_name = str(inputs.get("imageName", name))
        repository = image_name.rsplit(":", 1)[0]
        # From the repository, not the tag, so a server change does not ripple through every snapshot.
        digest = _hex(typ, name, repository, length=64)
        rid = f"{repository}@sha256:{digest}"
        out = {"repoDigest": rid, "baseImageName": image_name, "registryServer": repository.split("/")[0]}
    elif typ == "kubernetes:helm.sh/v3:Release":
        out = {
            "status": {"status": "deployed", "name": inputs.get("name"), "namespace": inputs.get("namespace")}
        }
    return rid, {**inputs, **out}


def caller_identity() -> dict[str, str]:
    """What ``aws sts get-caller-identity`` returns for the deploy role's session."""
    return {
        "id": ACCOUNT,
        "accountId": ACCOUNT,
        "arn": f"arn:aws:sts::{ACCOUNT}:assumed-role/dualdeploy-github-deploy/pulumi",
        "userId": "AROAEXAMPLEDEPLOYROLE:pulumi",
    }


def run(
    stack: str,
    project_dir: Path,
    secrets: dict[str, str] | None = None,
    overrides: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run the program for ``stack`` under mocks, in this process, from ``project_dir``.

    Call once per process (see the module docstring).

    Returns:
        ``{"stack", "resources": [...], "outputs": {...}, "secret_outputs": [...], "seconds"}``.
    """
    import pulumi
    from pulumi.runtime import rpc
    from pulumi.runtime.mocks import MockMonitor
    from pulumi.runtime.stack import run_pulumi_func
    from pulumi.runtime.sync_await import _ensure_event_loop, _sync_await

    config, secret_keys = stack_config(stack, secrets, overrides)
    region = config.get("aws:region", "us-east-1")
    records: list[dict[str, Any]] = []

    class CloudMocks(pulumi.runtime.Mocks):
        def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str, dict[str, Any]]:
            return mock_outputs(args.typ, args.name, dict(args.inputs), region)

        def call(self, args: pulumi.runtime.MockCallArgs) -> tuple[dict[str, Any], list[tuple[str, str]]]:
            if args.token == "aws:ecr/getAuthorizationToken:getAuthorizationToken":
                registry = args.args.get("registryId") or ACCOUNT
                token = f"mock-ecr-password-{_hex('ecr', registry, length=24)}"
                return {
                    "id": region,
                    "registryId": registry,
                    "userName": "AWS",
                    "password": token,
                    "authorizationToken": base64.b64encode(f"AWS:{token}".encode()).decode(),
                    "proxyEndpoint": f"https://{registry}.dkr.ecr.{region}.amazonaws.com",
                    "expiresAt": "2026-11-30T09:00:00Z",
                }, []  # no check failures (None breaks the SDK's mock monitor)
            if args.token == "aws:index/getCallerIdentity:getCallerIdentity":
                return caller_identity(), []
            raise AssertionError(f"the program made an unexpected provider call: {args.token}")

    class RecordingMonitor(MockMonitor):
        """The mock monitor, also noting each resource's parent and provider.

        Passing a monitor is public API: ``set_mocks(..., monitor=)``.
        """

        def RegisterResource(self, request: Any) -> Any:  # noqa: N802 - gRPC method name
            # Registrations arrive on executor threads: build the whole record, then append once.
            _ensure_event_loop()
            records.append(
                {
                    "type": request.type,
                    "name": request.name,
                    "parent": request.parent.split("::")[-1] if request.parent else None,
                    "parent_type": request.parent.split("::")[-2].split("$")[-1] if request.parent else None,
                    "custom": bool(request.custom),
                    "provider": request.provider.split("::")[-2] if request.provider else None,
                    "inputs": rpc.deserialize_properties(request.object)
                    if request.type != "pulumi:pulumi:Stack"
                    else {},
                }
            )
            return super().RegisterResource(request)

    mocks = CloudMocks()
    pulumi.runtime.set_all_config(config, secret_keys)
    pulumi.runtime.set_mocks(
        mocks, project="dualdeploy", stack=stack, preview=False, monitor=RecordingMonitor(mocks)
    )

    os.chdir(project_dir)
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    outputs: dict[str, Any] = {}
    secret_outputs: list[str] = []

    async def collect() -> None:
        root = pulumi.runtime.get_root_resource()
        for key, value in sorted(getattr(root, "outputs", {}).items()):
            out = pulumi.Output.from_input(value)
            outputs[key] = await out.future()
            if await out.is_secret():
                secret_outputs.append(key)

    def program() -> None:
        runpy.run_path(str(REPO_ROOT / "__main__.py"), run_name="__main__")

    started = time.perf_counter()
    error = None
    try:
        _sync_await(run_pulumi_func(program))
        _sync_await(run_pulumi_func(lambda: _sync_await(collect())))
    except Exception as exc:  # reported in the graph and by the exit status
        error = f"{type(exc).__name__}: {exc}"
        if os.environ.get("HARNESS_TRACEBACK"):
            import traceback

            traceback.print_exc()
    seconds = time.perf_counter() - started
    return {
        "stack": stack,
        "resources": records,
        "outputs": outputs,
        "secret_outputs": secret_outputs,
        "seconds": seconds,
        "error": error,
    }


def mask_secrets(value: Any) -> Any:
    """Replace secret-wrapped values by a marker (for snapshots and plaintext scans).

    Whole floats become ints: the wire format carries every number as a float, and
    ``minSize: 2`` reads better than ``2.0`` in a snapshot diff.
    """
    if is_secret(value):
        return SECRET_MASK
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: mask_secrets(v) for k, v in value.items() if not str(k).startswith("__")}
    if isinstance(value, list):
        return [mask_secrets(v) for v in value]
    return value


def secret_values(value: Any) -> list[Any]:
    """Every secret-wrapped value inside ``value`` (unwrapped)."""
    if is_secret(value):
        return [value["value"]]
    if isinstance(value, dict):
        return [s for v in value.values() for s in secret_values(v)]
    if isinstance(value, list):
        return [s for v in value for s in secret_values(v)]
    return []


def snapshot(graph: dict[str, Any]) -> dict[str, Any]:
    """The reviewable graph: each resource's type, name, parent and inputs (tags and secrets masked).

    Tags are left out (their own test checks them on every taggable resource) so that a
    new tag does not rewrite every line of every snapshot.
    """
    resources = []
    for rec in sorted(graph["resources"], key=lambda r: (r["parent"] or "", r["type"], r["name"])):
        inputs = {k: v for k, v in mask_secrets(rec["inputs"]).items() if k not in ("tags", "tagsAll")}
        if rec["type"] == "docker:index/image:Image":
            # The tag ends in a hash of serving/ (components/aws/model_image.py): a server change must not
            # rewrite the cloud snapshots. Its format is checked by a test.
            inputs["imageName"] = re.sub(r"-[0-9a-f]{12}$", "-<source-hash>", str(inputs.get("imageName")))
        resources.append(
            {"type": rec["type"], "name": rec["name"], "parent": rec["parent"], "inputs": inputs}
        )
    return {
        "stack": graph["stack"],
        "resource_count": len(resources),
        "resources": resources,
        "outputs": sorted(graph["outputs"]),
        "secret_outputs": sorted(graph["secret_outputs"]),
    }


def write_fixture_bundle(
    dist: Path,
    model: str,
    engine_arches: tuple[str, ...] = (),
    version: str = "0123456789ab",
    teacher: tuple[str, str] | None = None,
) -> Path:
    """Write a small signed bundle ``dist/<model>/<version>`` and point ``latest`` at it.

    Test data for the config rules: the ONNX and engine files are placeholder bytes, but
    the manifest, checksums and signature are real (written with contract.bundle), and
    each entry of ``engine_arches`` is declared as a TensorRT variant with that ``gpu_arch``.
    With ``teacher`` (model, version) the manifest carries a calibrated cascade to it.
    """
    import numpy as np

    from contract import bundle

    folder = dist / model / version
    folder.mkdir(parents=True)
    (folder / "model.fp32.onnx").write_bytes(b"placeholder onnx for config tests")
    bundle.save_tensors(folder / "golden/inputs.npz", {"x": np.zeros((2, 4), np.float32)})
    bundle.save_tensors(folder / "golden/outputs.npz", {"y": np.zeros((2, 3), np.float32)})
    variants: list[dict[str, Any]] = [
        {
            "name": "fp32",
            "file": "model.fp32.onnx",
            "format": "onnx",
            "precision": "fp32",
            "device_classes": ["x86_cpu", "nvidia_gpu"],
            "tolerance": {"kind": "allclose", "atol": 1e-5, "rtol": 1e-4},
            "metrics": {},
        }
    ]
    for arch in engine_arches:
        engine = f"model.trt-{arch}-fp16.engine"
        (folder / engine).write_bytes(f"placeholder engine {arch}".encode())
        variants.append(
            {
                "name": f"trt-{arch}-fp16",
                "file": engine,
                "format": "tensorrt",
                "precision": "fp16",
                "device_classes": ["nvidia_gpu"],
                "tolerance": {"kind": "top1", "min_agreement": 0.99},
                "metrics": {},
                "gpu_arch": arch,
                "tensorrt_version": "10.0",
                "cuda_version": "12.4",
            }
        )
    files = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    manifest = {
        "schema_version": bundle.SCHEMA_VERSION,
        "model": model,
        "version": version,
        "task": "classification",
        "inputs": [{"name": "x", "dtype": "float32", "shape": ["batch", 4], "allow_nonfinite": False}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": ["batch", 3]}],
        "files": bundle.file_entries(folder, files),
        "variants": variants,
        "golden": {"inputs": "golden/inputs.npz", "outputs": "golden/outputs.npz"},
        "serving": {"max_batch_size": 8, "max_queue_delay_ms": 2.0},
        "tools": {},
        "skipped": [],
    }
    if teacher is not None:
        manifest["cascade"] = {
            "measure": "margin",
            "output": "y",
            "threshold": 0.17,
            "target_agreement": 0.998,
            "expected_escalation_rate": 0.05,
            "expected_agreement": 1.0,
            "student_agreement": 0.99,
            "samples": 2048,
            "seed": 3,
            "teacher": {"model": teacher[0], "version": teacher[1]},
        }
    key_path = dist.parent / ".keys" / "dev-ed25519.pem"
    key = bundle.load_private_key(key_path) if key_path.exists() else bundle.generate_key(key_path)
    bundle.write_manifest(folder, manifest, key)
    (dist / model / "latest").symlink_to(version)
    return folder


def make_project(root: Path, engine_arches: tuple[str, ...] = ()) -> Path:
    """A project folder for program runs: fixture bundles for demo and demo-distilled, the image's
    build sources (serving/, model_build/) linked in as the Docker build context holds them, and
    the repository's ansible/ folder when it exists (the edge stacks read inventories)."""
    root.mkdir(parents=True, exist_ok=True)
    write_fixture_bundle(root / "dist", "demo", engine_arches)
    write_fixture_bundle(root / "dist", "demo-distilled", teacher=("demo", "0123456789ab"))
    for source in ("serving", "contract", "model_build"):
        (root / source).symlink_to(REPO_ROOT / source)
    if (REPO_ROOT / "ansible").is_dir():
        (root / "ansible").symlink_to(REPO_ROOT / "ansible")
    return root


def main(argv: list[str] | None = None) -> int:
    """CLI: run one stack under mocks and write the graph JSON."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("stack", help="stack name: stacks/Pulumi.<stack>.yaml")
    parser.add_argument("--project-dir", type=Path, required=True, help="folder the program runs from")
    parser.add_argument("--out", type=Path, required=True, help="where to write the graph JSON")
    parser.add_argument(
        "--secret", action="append", default=[], metavar="KEY=VALUE", help="plaintext for a secure config key"
    )
    parser.add_argument(
        "--config", action="append", default=[], metavar="KEY=VALUE", help="add or replace a config key"
    )
    args = parser.parse_args(argv)
    secrets = dict(item.split("=", 1) for item in args.secret)
    overrides = dict(item.split("=", 1) for item in args.config)
    out_path = args.out.resolve()
    graph = run(args.stack, args.project_dir.resolve(), secrets, overrides)
    out_path.write_text(json.dumps(graph, indent=1, sort_keys=True, default=str))
    if graph["error"]:
        print(graph["error"], file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
