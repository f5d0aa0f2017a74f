"""The site kit: one command that makes a new site's inventory, its certificates and its secrets.

    python -m deploy.site_kit init --site ward-3 --public-key site-signing.pub \\
        --host box-1=10.20.3.11 --host box-2=10.20.3.12 --management-network 10.0.0.5/32
    python -m deploy.site_kit certs --site ward-3     # after editing hosts.yml: re-issue what changed

``init`` writes ``ansible/inventories/<site>/`` from the example site's settings:

- ``hosts.yml``: the devices, one group per device class;
- ``group_vars/all/main.yml``: the site's settings, secrets only by reference;
- ``group_vars/all/vault.yml`` (Ansible Vault): a random inference token and a separate metrics token;
- ``host_vars/<host>/vault.yml`` (Ansible Vault): the device's TLS certificate and key, signed by the
  site CA, with the device's name and address as subject alternative names;
- ``.site/``: the site CA's certificate (clients and Prometheus trust it), its key (Ansible Vault), and the
  bundle signer's public key. A dot-folder, because Ansible reads every other file under an inventory
  folder as inventory.

Every secret is encrypted with ``ansible-vault encrypt --vault-password-file`` (no terminal, no editor).
Nothing here talks to a device: the rollout's preflight checks the devices.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from contract.bundle import BundleError, key_id, load_public_key

REPO_ROOT = Path(__file__).resolve().parent.parent
INVENTORIES = REPO_ROOT / "ansible" / "inventories"
EXAMPLE = INVENTORIES / "example-site"
DEV_PUBLIC_KEY = REPO_ROOT / ".keys" / "dev-ed25519.pub"
DEVICE_GROUPS = ("x86_cpu", "arm64_cpu", "nvidia_gpu", "jetson", "ascend")
SITE_DIR = ".site"
CA_DAYS = 3650
CERT_DAYS = 825
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
_HOST = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


class SiteKitError(Exception):
    """A site cannot be created as asked; the message names the option, file or host."""


@dataclass(frozen=True)
class Host:
    """One device of the site: its inventory name, address and device-class group."""

    name: str
    address: str
    group: str = "x86_cpu"

    @property
    def sans(self) -> list[x509.GeneralName]:
        """The names a client may use for this device: its inventory name and its address."""
        names: list[x509.GeneralName] = [x509.DNSName(self.name)]
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(self.address)))
        except ValueError:
            if self.address != self.name:
                names.append(x509.DNSName(self.address))
        return names


@dataclass
class SiteOptions:
    """What ``init`` needs to make a site."""

    site: str
    public_key: Path
    vault_password_file: Path
    hosts: list[Host]
    management_networks: list[str] = field(default_factory=list)
    client_networks: list[str] = field(default_factory=list)
    inventories: Path = INVENTORIES
    allow_dev_key: bool = False


# --------------------------------------------------------------------------- parsing


def parse_host(text: str) -> Host:
    """``NAME=ADDRESS`` or ``NAME=ADDRESS,GROUP`` (group: a device class, default x86_cpu).

    Raises:
        SiteKitError: naming the bad part.
    """
    name, sep, rest = text.partition("=")
    address, _, group = rest.partition(",")
    group = group or "x86_cpu"
    if not sep or not address:
        raise SiteKitError(f"--host {text!r}: expected NAME=ADDRESS or NAME=ADDRESS,GROUP")
    if not _HOST.fullmatch(name):
        raise SiteKitError(f"--host {text!r}: the name {name!r} must be letters, digits, '.', '_' or '-'")
    if not _HOST.fullmatch(address) and not _is_ip(address):
        raise SiteKitError(f"--host {text!r}: {address!r} is neither an IP address nor a host name")
    if group not in DEVICE_GROUPS:
        raise SiteKitError(f"--host {text!r}: group {group!r} is not one of {', '.join(DEVICE_GROUPS)}")
    return Host(name, address, group)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _check_networks(option: str, networks: Iterable[str]) -> list[str]:
    out = []
    for net in networks:
        try:
            out.append(str(ipaddress.ip_network(net, strict=False)))
        except ValueError:
            raise SiteKitError(f"{option} {net!r}: not an IPv4 or IPv6 address or CIDR") from None
    return out


def read_hosts(inventory: Path) -> list[Host]:
    """The devices of a site inventory's ``hosts.yml`` (the ``edge`` group's children)."""
    path = inventory / "hosts.yml"
    if not path.is_file():
        raise SiteKitError(f"{path}: no hosts.yml (run `init` first)")
    doc = yaml.safe_load(path.read_text()) or {}
    groups = (((doc.get("all") or {}).get("children") or {}).get("edge") or {}).get("children") or {}
    hosts = []
    for group, body in groups.items():
        for name, hvars in ((body or {}).get("hosts") or {}).items():
            address = (hvars or {}).get("ansible_host")
            if not address:
                raise SiteKitError(f"{path}: host {name} has no ansible_host")
            hosts.append(Host(str(name), str(address), str(group)))
    if not hosts:
        raise SiteKitError(f"{path}: no hosts under all.children.edge.children.<group>.hosts")
    return hosts


# --------------------------------------------------------------------------- certificates


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _key_usage(*, certificates: bool) -> x509.KeyUsage:
    """A CA signs certificates and CRLs only; a server key signs its TLS handshakes only."""
    return x509.KeyUsage(
        digital_signature=not certificates,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=certificates,
        crl_sign=certificates,
        encipher_only=False,
        decipher_only=False,
    )


def make_ca(site: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A site CA: P-256 key, CA:TRUE with path length 0, signs certificates and CRLs only."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "dualdeploy"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"dualdeploy site CA {site}"),
        ]
    )
    now = dt.datetime.now(dt.UTC)
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(certificates=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def issue_device_cert(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, host: Host
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A server certificate for one device: its name and address as SANs, serverAuth only."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host.name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CERT_DAYS))
        .add_extension(x509.SubjectAlternativeName(host.sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(certificates=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def cert_sans(cert: x509.Certificate) -> set[str]:
    """The DNS names and IP addresses a certificate covers, as strings."""
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(v) for v in ext.get_values_for_type(x509.DNSName)} | {
        str(v) for v in ext.get_values_for_type(x509.IPAddress)
    }


# --------------------------------------------------------------------------- vault


def _ansible_vault() -> str:
    """This environment's ansible-vault (the project venv's), whatever PATH says."""
    beside = Path(sys.executable).parent / "ansible-vault"
    found = str(beside) if beside.exists() else shutil.which("ansible-vault")
    if not found:
        raise SiteKitError("ansible-vault not found: run `make setup` (it installs Ansible into .venv)")
    return found


def vault_encrypt(data: bytes, dest: Path, password_file: Path) -> Path:
    """Write ``data`` encrypted with Ansible Vault to ``dest``; the plain text never lies in its folder."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="site-kit-") as tmp:
        plain = Path(tmp) / "plain"
        fd = os.open(plain, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        run = subprocess.run(
            [
                _ansible_vault(),
                "encrypt",
                "--vault-password-file",
                str(password_file),
                "--output",
                "-",
                str(plain),
            ],
            capture_output=True,
            check=False,
        )
    if run.returncode != 0:
        raise SiteKitError(f"ansible-vault encrypt for {dest} failed: {run.stderr.decode().strip()}")
    dest.write_bytes(run.stdout)
    dest.chmod(0o600)
    return dest


def vault_decrypt(path: Path, password_file: Path) -> bytes:
    """The plain text of an Ansible Vault file.

    Raises:
        SiteKitError: naming the file and the fix (wrong or missing password file).
    """
    run = subprocess.run(
        [_ansible_vault(), "view", "--vault-password-file", str(password_file), str(path)],
        capture_output=True,
        check=False,
        env={**os.environ, "PAGER": "cat", "ANSIBLE_NOCOLOR": "1"},
    )
    if run.returncode != 0:
        raise SiteKitError(
            f"{path} does not open with the vault password in {password_file}: {run.stderr.decode().strip()} "
            "(use the password file that `init` wrote for this site)"
        )
    return run.stdout


def ensure_password_file(path: Path) -> bool:
    """Create a random vault password file (mode 0600) unless one exists; True when created.

    Raises:
        SiteKitError: an existing file is readable by others, or empty.
    """
    if path.exists():
        if path.stat().st_mode & 0o077:
            raise SiteKitError(f"--vault-password-file {path}: readable by others; run `chmod 600 {path}`")
        if not path.read_text().strip():
            raise SiteKitError(f"--vault-password-file {path}: the file is empty")
        return False
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(secrets.token_urlsafe(32) + "\n")
    return True


def default_password_file(site: str) -> Path:
    """Where ``init`` keeps a site's vault password unless told otherwise: outside the checkout."""
    return Path.home() / ".config" / "dualdeploy" / f"{site}.vault-password"


# --------------------------------------------------------------------------- the inventory


def _site_settings(options: SiteOptions) -> str:
    """group_vars/all/main.yml: the example site's settings with this site's values, secrets by reference."""
    example = yaml.safe_load((EXAMPLE / "group_vars" / "all" / "main.yml").read_text())
    settings: dict[str, Any] = {
        "ansible_user": example["ansible_user"],
        "ansible_become": True,
        "edge_common_prefix": example["edge_common_prefix"],
        "edge_bundle_dir": example["edge_bundle_dir"],
        "edge_bundle_public_key": f"{{{{ inventory_dir }}}}/{SITE_DIR}/signing.pub",
        "edge_bundle_keep_releases": example["edge_bundle_keep_releases"],
        "edge_allow_dev_key": options.allow_dev_key,
        "edge_service_bind_address": "{{ ansible_host }}",
        "edge_service_port": example["edge_service_port"],
        "edge_service_tls_enabled": True,
        "edge_service_tls_cert": "{{ vault_edge_tls_cert }}",
        "edge_service_tls_key": "{{ vault_edge_tls_key }}",
        "edge_service_token_enabled": True,
        "edge_service_token": "{{ vault_edge_token }}",
        "edge_service_metrics_token": "{{ vault_edge_metrics_token }}",
        "edge_hardening_nftables_enabled": True,
        "edge_service_ip_allow": "{{ edge_hardening_client_networks + edge_hardening_management_networks }}",
        "edge_hardening_management_networks": options.management_networks,
        "edge_hardening_client_networks": options.client_networks,
        "edge_monitoring_site": options.site,
        # The monitoring play runs on the controller (localhost), where inventory_dir is not defined.
        "edge_monitoring_output_dir": "{{ edge_common_repo_root }}/build/sites/"
        + options.site
        + "/prometheus",
        "edge_monitoring_metrics_token": "{{ vault_edge_metrics_token }}",
    }
    header = (
        f"---\n# Site {options.site}, written by `python -m deploy.site_kit init` from the example site.\n"
        "# Secrets are only referenced here: the inference and metrics tokens are in\n"
        "# group_vars/all/vault.yml, each device's TLS certificate and key in host_vars/<host>/vault.yml\n"
        "# (Ansible Vault, the site's password file). Every variable is documented in the defaults/main.yml\n"
        "# of its role (roles/edge_*/). The management networks must include the address this controller\n"
        "# reaches the devices from (the preflight refuses a firewall that would cut its SSH); client\n"
        "# networks reach the inference port.\n"
    )
    return header + yaml.safe_dump(settings, sort_keys=False, width=120)


def _hosts_yaml(hosts: Sequence[Host]) -> str:
    children: dict[str, Any] = {}
    for host in hosts:
        children.setdefault(host.group, {"hosts": {}})["hosts"][host.name] = {"ansible_host": host.address}
    doc = {"all": {"children": {"edge": {"children": children}}}}
    return (
        "---\n# The site's devices, one group per device class (each device's class is still detected).\n"
        "# After changing an address or adding a device, run `make site-certs SITE=<site>`.\n"
        + yaml.safe_dump(doc, sort_keys=False)
    )


def _write_device_cert(
    inventory: Path, host: Host, ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, password: Path
) -> None:
    key, cert = issue_device_cert(ca_key, ca_cert, host)
    data = {
        # The chain (device, then CA): the health gate on the device trusts this file as its CA file, and
        # Python before 3.13 accepts a leaf in a CA file only with its self-signed root beside it.
        "vault_edge_tls_cert": (
            cert.public_bytes(serialization.Encoding.PEM) + ca_cert.public_bytes(serialization.Encoding.PEM)
        ).decode(),
        "vault_edge_tls_key": _pem_key(key).decode(),
    }
    vault_encrypt(yaml.safe_dump(data).encode(), inventory / "host_vars" / host.name / "vault.yml", password)


def init_site(options: SiteOptions) -> Path:
    """Create ``<inventories>/<site>/``: hosts, settings, vaults, CA and device certificates.

    Raises:
        SiteKitError: the site exists, or an option is unusable (named in the message).
    """
    if not _NAME.fullmatch(options.site):
        raise SiteKitError(f"--site {options.site!r}: use lower-case letters, digits, '.', '_' or '-'")
    if not options.hosts:
        raise SiteKitError("no --host given: name every device as --host NAME=ADDRESS[,GROUP]")
    dupes = {h.name for h in options.hosts if sum(o.name == h.name for o in options.hosts) > 1}
    if dupes:
        raise SiteKitError(f"--host: {', '.join(sorted(dupes))} given more than once")
    inventory = options.inventories / options.site
    if inventory.exists():
        raise SiteKitError(
            f"{inventory} exists; pick another --site or remove it (`certs` re-issues certificates)"
        )
    try:
        public = load_public_key(options.public_key)
    except (OSError, BundleError, ValueError) as exc:
        raise SiteKitError(
            f"--public-key {options.public_key}: not an ed25519 public key PEM ({exc})"
        ) from None
    is_dev = DEV_PUBLIC_KEY.is_file() and key_id(public) == key_id(load_public_key(DEV_PUBLIC_KEY))
    if is_dev and not options.allow_dev_key:
        raise SiteKitError(
            f"--public-key {options.public_key} is the development key: bundles signed with it must not "
            "reach a site. Give the site signer's public key, or --allow-dev-key for a test site."
        )
    management = _check_networks("--management-network", options.management_networks)
    clients = _check_networks("--client-network", options.client_networks)
    options = SiteOptions(
        **{**options.__dict__, "management_networks": management, "client_networks": clients}
    )
    ensure_password_file(options.vault_password_file)

    options.inventories.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{options.site}.", dir=options.inventories))
    try:
        site_dir = staging / SITE_DIR
        site_dir.mkdir(mode=0o700)
        (staging / "hosts.yml").write_text(_hosts_yaml(options.hosts))
        (staging / "group_vars" / "all").mkdir(parents=True)
        (staging / "group_vars" / "all" / "main.yml").write_text(_site_settings(options))
        # inventory_dir is defined for the devices only, not for the controller's own play: edge group.
        ca_lookup = "{{ lookup('ansible.builtin.file', inventory_dir ~ '/" + SITE_DIR + "/ca.crt') }}"
        (staging / "group_vars" / "edge.yml").write_text(
            "---\n# The site CA that Prometheus trusts; the monitoring role writes it beside the targets.\n"
            + yaml.safe_dump({"edge_monitoring_ca_cert": ca_lookup})
        )
        for group in sorted({h.group for h in options.hosts}):
            example = EXAMPLE / "group_vars" / f"{group}.yml"
            if example.is_file():
                shutil.copyfile(example, staging / "group_vars" / f"{group}.yml")
        tokens = {
            "vault_edge_token": secrets.token_urlsafe(32),
            "vault_edge_metrics_token": secrets.token_urlsafe(32),
        }
        password = options.vault_password_file
        vault_encrypt(yaml.safe_dump(tokens).encode(), staging / "group_vars" / "all" / "vault.yml", password)
        ca_key, ca_cert = make_ca(options.site)
        (site_dir / "ca.crt").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
        vault_encrypt(_pem_key(ca_key), site_dir / "ca.key.vault", password)
        shutil.copyfile(options.public_key, site_dir / "signing.pub")
        for host in options.hosts:
            _write_device_cert(staging, host, ca_key, ca_cert, password)
        staging.chmod(0o755)
        staging.rename(inventory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return inventory


def _load_ca(inventory: Path, password: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    ca_cert = x509.load_pem_x509_certificate((inventory / SITE_DIR / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key(
        vault_decrypt(inventory / SITE_DIR / "ca.key.vault", password), None
    )
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise SiteKitError(f"{inventory / SITE_DIR / 'ca.key.vault'}: not the site kit's EC CA key")
    return ca_key, ca_cert


def device_cert(inventory: Path, host: str, password: Path) -> x509.Certificate:
    """The certificate in a device's host_vars vault."""
    data = yaml.safe_load(vault_decrypt(inventory / "host_vars" / host / "vault.yml", password))
    return x509.load_pem_x509_certificate(data["vault_edge_tls_cert"].encode())


def renew_certs(inventory: Path, password: Path, *, force: bool = False) -> list[str]:
    """Issue a certificate for every host of ``hosts.yml`` that has none, or whose SANs differ.

    Returns:
        The hosts that got a new certificate.
    """
    ca_key, ca_cert = _load_ca(inventory, password)
    renewed = []
    for host in read_hosts(inventory):
        vault = inventory / "host_vars" / host.name / "vault.yml"
        wanted = {str(v.value) for v in host.sans}
        if not force and vault.is_file() and cert_sans(device_cert(inventory, host.name, password)) == wanted:
            continue
        _write_device_cert(inventory, host, ca_key, ca_cert, password)
        renewed.append(host.name)
    return renewed


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    """``init`` a site, or re-issue its ``certs``."""
    parser = argparse.ArgumentParser(prog="python -m deploy.site_kit", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    init = sub.add_parser("init", help="create ansible/inventories/<site>/ with certificates and secrets")
    certs = sub.add_parser("certs", help="issue certificates for new or re-addressed hosts of hosts.yml")
    for p in (init, certs):
        p.add_argument("--site", required=True, help="site name (the inventory folder's name)")
        p.add_argument(
            "--vault-password-file",
            type=Path,
            help="the site's vault password file (init creates it when absent); "
            "default ~/.config/dualdeploy/<site>.vault-password",
        )
        p.add_argument("--inventories", type=Path, default=INVENTORIES, help="folder of site inventories")
    init.add_argument(
        "--public-key", type=Path, required=True, help="the site signer's ed25519 public key (PEM)"
    )
    init.add_argument(
        "--host", action="append", default=[], help="a device as NAME=ADDRESS or NAME=ADDRESS,GROUP (repeat)"
    )
    init.add_argument(
        "--management-network",
        action="append",
        default=[],
        help="CIDR the controller, Prometheus, DNS and NTP are in (repeat); the firewall lets it through",
    )
    init.add_argument(
        "--client-network",
        action="append",
        default=[],
        help="CIDR allowed to reach the inference port (repeat)",
    )
    init.add_argument(
        "--allow-dev-key", action="store_true", help="accept the development key (test sites only)"
    )
    certs.add_argument("--force", action="store_true", help="re-issue every device certificate")
    args = parser.parse_args(argv)
    password = args.vault_password_file or default_password_file(args.site)
    try:
        if args.command == "init":
            created = not password.exists()
            inventory = init_site(
                SiteOptions(
                    site=args.site,
                    public_key=args.public_key,
                    vault_password_file=password,
                    hosts=[parse_host(h) for h in args.host],
                    management_networks=args.management_network,
                    client_networks=args.client_network,
                    inventories=args.inventories,
                    allow_dev_key=args.allow_dev_key,
                )
            )
            print(f"site {args.site}: {inventory}")
            print(
                f"vault password file: {password}{' (new: keep a copy off this machine)' if created else ''}"
            )
            print(f"site CA for clients and Prometheus: {inventory / SITE_DIR / 'ca.crt'}")
            if not args.management_network:
                print(
                    "warning: no --management-network: set edge_hardening_management_networks "
                    "in group_vars/all/main.yml before a rollout"
                )
            print(f"next: ansible/run {args.site} check, then: ansible/run {args.site} rollout BUNDLE")
        else:
            renewed = renew_certs(args.inventories / args.site, password, force=args.force)
            print(f"new certificates: {', '.join(renewed) or 'none needed'}")
    except SiteKitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
