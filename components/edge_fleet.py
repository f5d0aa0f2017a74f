"""EdgeFleet: roll a bundle out to on-site devices from ``pulumi up``, through the same playbook.

A ComponentResource wrapping one dynamic-provider resource whose create and update run
``ansible/edge.yml`` with ansible-runner (``deploy.edge_rollout``), exactly as ``make edge`` and a
technician's ``ansible-playbook`` do. Its ``diff`` compares three fingerprints computed while the program
runs (also during a preview): the bundle version, a content hash of the inventory, and a content hash of
the playbook, roles and collection. A preview therefore shows the rollout without running it.

With ``escalation`` set (the hybrid stack), the devices send the inputs their calibrated cascade is
unsure of to the cloud teacher: the endpoint, the CA and the token go to the playbook as the site's
``edge_escalation*`` variables, and a new certificate authority, token or endpoint rolls them out again.

Removing the component from a stack does not uninstall the devices: they keep serving their release.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pulumi
import pulumi.dynamic

from deploy.edge_rollout import bundle_version, inventory_hash, playbook_hash

# Inputs whose change means a new rollout. The vault password is deliberately absent: rotating it
# changes nothing on the devices.
FINGERPRINT_KEYS = (
    "bundle_version",
    "inventory_hash",
    "playbook_hash",
    "limit",
    "public_key",
    "playbook",
    "escalation",
    "escalation_token",
)
SECRET_KEYS = ("vault_password", "escalation_token")
"""Inputs kept as secrets in the state (the vault password is not even kept: see :meth:`_rollout`)."""


@dataclass
class EdgeEscalationArgs:
    """Where the devices escalate to: the cloud teacher (``ModelService`` with ``ServingIdentity``)."""

    endpoint: pulumi.Input[str]
    """The teacher's v2 base URL, ``https://address:443``."""

    ca_pem: pulumi.Input[str]
    """The CA its certificate chains to; the devices trust nothing else for it."""

    token: pulumi.Input[str]
    """Its inference bearer token (a secret)."""


def escalation_extravars(props: dict[str, Any]) -> dict[str, Any]:
    """The playbook's ``edge_escalation*`` variables from the rollout's inputs ({} without escalation).

    Extra variables win over the inventory: a stack that sets escalation decides it for its site.
    """
    escalation = props.get("escalation")
    if not escalation:
        return {}
    return {
        "edge_escalation": "low_confidence",
        "edge_escalation_endpoint": escalation["endpoint"],
        "edge_escalation_ca": escalation["ca"],
        "edge_escalation_token": props["escalation_token"],
    }


@dataclass
class EdgeFleetArgs:
    """Inputs of :class:`EdgeFleet`."""

    inventory: pulumi.Input[str]
    """Inventory file or folder (relative paths are from the repository root)."""

    bundle_dir: pulumi.Input[str]
    """The bundle to roll out, e.g. ``dist/demo/latest`` (resolved to its version folder)."""

    playbook: pulumi.Input[str] = "ansible/edge.yml"
    """The playbook to run."""

    public_key: pulumi.Input[str] | None = None
    """The signer's ed25519 public key; ``None`` uses the development key (with a warning)."""

    vault_password: pulumi.Input[str] | None = None
    """The inventory's Ansible Vault password. Pass a secret (``config.require_secret``)."""

    limit: pulumi.Input[str] | None = None
    """An Ansible host pattern restricting the rollout."""

    escalation: EdgeEscalationArgs | None = None
    """The cloud teacher the devices escalate to; None: the inventory decides (default ``never``)."""


def _resolve(path: str) -> Path:
    """A stack path as the program sees it: relative to the working folder.

    Pulumi runs the program from the project folder, so this is the project root in real runs;
    resolving against this module's own checkout instead would break a project that vendors
    the components, and the test harness's fixture projects.
    """
    candidate = Path(path)
    return candidate if candidate.is_absolute() else Path.cwd() / candidate


def fingerprints(inventory: str, bundle_dir: str, playbook: str) -> dict[str, str]:
    """The diff keys of a rollout, computed from the files on the controller.

    Raises:
        ValueError: naming the input whose file or folder is missing or unreadable.
    """
    inv, bundle, book = _resolve(inventory), _resolve(bundle_dir), _resolve(playbook)
    if not inv.exists():
        raise ValueError(f"EdgeFleetArgs.inventory: {inv} does not exist")
    if not book.is_file():
        raise ValueError(f"EdgeFleetArgs.playbook: {book} is not a file")
    try:
        version = bundle_version(bundle)
    except (OSError, ValueError) as exc:
        raise ValueError(f"EdgeFleetArgs.bundle_dir: {exc}") from exc
    return {
        "bundle_version": version,
        "inventory_hash": inventory_hash(inv),
        "playbook_hash": playbook_hash(book),
    }


class EdgeRolloutProvider(pulumi.dynamic.ResourceProvider):
    """Dynamic provider: diff on fingerprints, create/update run the playbook via ansible-runner."""

    def check(self, _olds: dict[str, Any], news: dict[str, Any]) -> pulumi.dynamic.CheckResult:
        """Reject inputs without an inventory or a bundle."""
        failures = [
            pulumi.dynamic.CheckFailure(key, f"{key} is required")
            for key in ("inventory", "bundle_dir", "bundle_version")
            if not news.get(key)
        ]
        return pulumi.dynamic.CheckResult(news, failures)

    def diff(self, _id: str, olds: dict[str, Any], news: dict[str, Any]) -> pulumi.dynamic.DiffResult:
        """A rollout is due when the bundle version, the inventory or the playbook content changed."""
        changed = [key for key in FINGERPRINT_KEYS if olds.get(key) != news.get(key)]
        return pulumi.dynamic.DiffResult(
            changes=bool(changed), replaces=[], stables=[], delete_before_replace=False
        )

    def create(self, props: dict[str, Any]) -> pulumi.dynamic.CreateResult:
        """Run the first rollout; the id names the inventory."""
        outs = self._rollout(props)
        ident = hashlib.sha256(str(props["inventory"]).encode()).hexdigest()[:12]
        return pulumi.dynamic.CreateResult(id_=f"edge-{ident}", outs=outs)

    def update(self, _id: str, _olds: dict[str, Any], news: dict[str, Any]) -> pulumi.dynamic.UpdateResult:
        """Roll the new bundle, inventory or playbook out."""
        return pulumi.dynamic.UpdateResult(outs=self._rollout(news))

    def delete(self, _id: str, _props: dict[str, Any]) -> None:
        """Leave the devices serving: an on-site fleet is not torn down by a stack change."""

    @staticmethod
    def _rollout(props: dict[str, Any]) -> dict[str, Any]:
        # Imported here: the provider is pickled into the state, its dependencies resolved at run time.
        from deploy.edge_rollout import run_rollout  # noqa: PLC0415

        result = run_rollout(
            _resolve(props["inventory"]),
            _resolve(props["bundle_dir"]),
            playbook=_resolve(props.get("playbook") or "ansible/edge.yml"),
            public_key=_resolve(props["public_key"]) if props.get("public_key") else None,
            vault_password=props.get("vault_password") or None,
            limit=props.get("limit") or None,
            extravars=escalation_extravars(props),
        )  # raises RolloutError naming failed and unreachable hosts
        hosts = {
            name: {"version": host.version, "status": host.status, "endpoint": host.endpoint}
            for name, host in sorted(result.hosts.items())
            if name != "localhost"
        }
        outs = {k: v for k, v in props.items() if k != "vault_password"}
        outs["hosts"] = hosts
        return outs


class _EdgeRollout(pulumi.dynamic.Resource, module="edge_fleet", name="EdgeRollout"):
    """The rollout resource (one per fleet)."""

    hosts: pulumi.Output[dict[str, dict[str, Any]]]

    def __init__(self, name: str, props: dict[str, Any], opts: pulumi.ResourceOptions) -> None:
        super().__init__(EdgeRolloutProvider(), name, {**props, "hosts": None}, opts)


class EdgeFleet(pulumi.ComponentResource):
    """An on-site fleet that serves one bundle, rolled out by ``ansible/edge.yml``.

    Attributes:
        hosts: host → ``{version, status, endpoint}`` after the rollout.
    """

    hosts: pulumi.Output[dict[str, dict[str, Any]]]

    def __init__(self, name: str, args: EdgeFleetArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        """Validate the inputs, fingerprint them and declare the rollout.

        Raises:
            ValueError: naming the input (inventory, bundle_dir, playbook, public_key) that is unusable.
        """
        super().__init__("dualdeploy:edge_fleet:EdgeFleet", name, None, opts)
        for field_name in ("inventory", "bundle_dir", "playbook"):
            value = getattr(args, field_name)
            if isinstance(value, str) and not value:
                raise ValueError(f"EdgeFleetArgs.{field_name} must not be empty")
        if isinstance(args.public_key, str) and not _resolve(args.public_key).is_file():
            raise ValueError(f"EdgeFleetArgs.public_key: {_resolve(args.public_key)} is not a file")
        prints = pulumi.Output.all(args.inventory, args.bundle_dir, args.playbook).apply(
            lambda values: fingerprints(*values)
        )
        if all(isinstance(v, str) for v in (args.inventory, args.bundle_dir, args.playbook)):
            fingerprints(str(args.inventory), str(args.bundle_dir), str(args.playbook))  # fail early
        password = pulumi.Output.secret(args.vault_password) if args.vault_password is not None else None
        props: dict[str, Any] = {
            "inventory": args.inventory,
            "bundle_dir": args.bundle_dir,
            "playbook": args.playbook,
            "public_key": args.public_key,
            "limit": args.limit,
            "vault_password": password,
            "bundle_version": prints.apply(lambda p: p["bundle_version"]),
            "inventory_hash": prints.apply(lambda p: p["inventory_hash"]),
            "playbook_hash": prints.apply(lambda p: p["playbook_hash"]),
            "escalation": None,
            "escalation_token": None,
        }
        if args.escalation is not None:
            props["escalation"] = {"endpoint": args.escalation.endpoint, "ca": args.escalation.ca_pem}
            props["escalation_token"] = pulumi.Output.secret(args.escalation.token)
        rollout = _EdgeRollout(
            f"{name}-rollout",
            props,
            pulumi.ResourceOptions(parent=self, additional_secret_outputs=list(SECRET_KEYS)),
        )
        self.hosts = rollout.hosts
        self.register_outputs({"hosts": self.hosts})
