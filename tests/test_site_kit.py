"""The site kit (`make site-init`): a new site's inventory, certificates and secrets from one command.

Everything is real: the certificates are checked with the `cryptography` library and by a TLS handshake,
the vault files are opened by Ansible's own CLIs, and the generated inventory goes through the real
playbook (its preflight, then a rollout to a local device with the site's TLS and token).
"""

from __future__ import annotations

import ipaddress
import json
import os
import ssl
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from edge_support import ANSIBLE, BIN, DEV_PUB, ansible_env, demo_bundle
from serving_support import free_port

from contract.bundle import generate_key, public_path
from deploy import site_kit
from deploy.edge_rollout import run_rollout

HOSTS = [site_kit.Host("ward-box", "10.20.3.11"), site_kit.Host("lab-orin", "10.40.2.21", "jetson")]


def _site(
    tmp_path: Path, hosts: list[site_kit.Host] = HOSTS, public_key: Path | None = None, **options: object
) -> tuple[Path, Path]:
    if public_key is None:
        generate_key(tmp_path / "keys" / "site-signing.pem")  # the site's own signer, not the dev key
        public_key = public_path(tmp_path / "keys" / "site-signing.pem")
    password = tmp_path / "secrets" / "site.vault-password"
    inventory = site_kit.init_site(
        site_kit.SiteOptions(
            site="ward-3",
            public_key=public_key,
            vault_password_file=password,
            hosts=list(hosts),
            management_networks=["10.0.0.5/32"],
            client_networks=["10.20.0.0/16"],
            inventories=tmp_path / "inventories",
            **options,  # type: ignore[arg-type]
        )
    )
    return inventory, password


def _vault_view(path: Path, password: Path | None) -> subprocess.CompletedProcess[str]:
    args = [str(BIN / "ansible-vault"), "view", str(path)]
    if password is not None:
        args += ["--vault-password-file", str(password)]
    return subprocess.run(
        args, capture_output=True, text=True, check=False, env={**ansible_env(), "PAGER": "cat"}
    )


def test_device_certificates_chain_to_the_site_ca_and_name_every_device_address(tmp_path: Path) -> None:
    inventory, password = _site(tmp_path)
    ca = x509.load_pem_x509_certificate((inventory / ".site" / "ca.crt").read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for host in HOSTS:
        cert = site_kit.device_cert(inventory, host.name, password)
        cert.verify_directly_issued_by(ca)  # raises unless the CA signed it
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address(host.address)]
        assert san.get_values_for_type(x509.DNSName) == [host.name]
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(usage) == [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]
    first = site_kit.device_cert(inventory, HOSTS[0].name, password)
    second = site_kit.device_cert(inventory, HOSTS[1].name, password)
    assert first.public_key() != second.public_key(), "each device has its own key"


def test_vault_files_open_with_the_password_file_and_not_without(tmp_path: Path) -> None:
    inventory, password = _site(tmp_path)
    group_vault = inventory / "group_vars" / "all" / "vault.yml"
    assert group_vault.read_text().startswith("$ANSIBLE_VAULT;")
    tokens = yaml.safe_load(_vault_view(group_vault, password).stdout)
    assert len(tokens["vault_edge_token"]) >= 40 and len(tokens["vault_edge_metrics_token"]) >= 40
    assert tokens["vault_edge_token"] != tokens["vault_edge_metrics_token"]
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-password\n")
    for path in (
        group_vault,
        inventory / "host_vars" / "ward-box" / "vault.yml",
        inventory / ".site" / "ca.key.vault",
    ):
        assert _vault_view(path, wrong).returncode != 0
        assert _vault_view(path, None).returncode != 0
    assert os.stat(password).st_mode & 0o777 == 0o600
    host = yaml.safe_load(_vault_view(inventory / "host_vars" / "ward-box" / "vault.yml", password).stdout)
    key = serialization.load_pem_private_key(host["vault_edge_tls_key"].encode(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.public_key() == site_kit.device_cert(inventory, "ward-box", password).public_key()


def test_inventory_resolves_every_secret_through_ansible(tmp_path: Path) -> None:
    inventory, password = _site(tmp_path)
    run = subprocess.run(
        [
            str(BIN / "ansible-inventory"),
            "-i",
            str(inventory),
            "--list",
            "--vault-password-file",
            str(password),
        ],
        capture_output=True,
        text=True,
        check=True,
        env=ansible_env(),
    )
    assert "Unable to parse" not in run.stderr, run.stderr  # the .site/ folder is not read as inventory
    data = json.loads(run.stdout)
    assert sorted(data["edge"]["children"]) == ["jetson", "x86_cpu"]
    box = data["_meta"]["hostvars"]["ward-box"]
    assert box["ansible_host"] == "10.20.3.11" and "BEGIN CERTIFICATE" in box["vault_edge_tls_cert"]
    assert box["edge_hardening_management_networks"] == ["10.0.0.5/32"]
    assert (inventory / ".site" / "signing.pub").read_text().startswith("-----BEGIN PUBLIC KEY")


def test_development_key_is_refused_unless_allowed(tmp_path: Path) -> None:
    options = {
        "site": "ward-3",
        "public_key": DEV_PUB,
        "vault_password_file": tmp_path / "pw",
        "hosts": HOSTS,
        "inventories": tmp_path,
    }
    with pytest.raises(site_kit.SiteKitError, match="development key"):
        site_kit.init_site(site_kit.SiteOptions(**options))  # type: ignore[arg-type]
    assert not (tmp_path / "ward-3").exists()
    inventory = site_kit.init_site(site_kit.SiteOptions(**options, allow_dev_key=True))  # type: ignore[arg-type]
    assert yaml.safe_load((inventory / "group_vars" / "all" / "main.yml").read_text())["edge_allow_dev_key"]


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("box", "NAME=ADDRESS"),
        ("box=10.0.0.1,tpu", "group 'tpu'"),
        ("bo x=10.0.0.1", "'bo x'"),
        ("box=10.0.0.1;reboot", "'10.0.0.1;reboot'"),
    ],
)
def test_bad_host_option_is_refused_naming_it(text: str, named: str) -> None:
    with pytest.raises(site_kit.SiteKitError, match="--host") as caught:
        site_kit.parse_host(text)
    assert named in str(caught.value)


def test_existing_site_is_never_overwritten(tmp_path: Path) -> None:
    inventory, _ = _site(tmp_path)
    before = (inventory / "group_vars" / "all" / "vault.yml").read_bytes()
    with pytest.raises(site_kit.SiteKitError, match="exists"):
        _site(tmp_path)
    assert (inventory / "group_vars" / "all" / "vault.yml").read_bytes() == before


def test_certs_reissues_only_for_a_changed_address(tmp_path: Path) -> None:
    inventory, password = _site(tmp_path)
    hosts = (inventory / "hosts.yml").read_text()
    (inventory / "hosts.yml").write_text(hosts.replace("10.20.3.11", "10.20.3.99"))
    assert site_kit.renew_certs(inventory, password) == ["ward-box"]
    assert "10.20.3.99" in site_kit.cert_sans(site_kit.device_cert(inventory, "ward-box", password))
    assert site_kit.renew_certs(inventory, password) == []


@pytest.mark.slow
def test_new_site_rolls_out_with_its_certificate_and_token(tmp_path: Path) -> None:
    """make site-init, then the rollout: the device serves https with the site CA and the site token.

    The site's one device is this machine over Ansible's local connection, so the firewall and become are
    off for it (extra variables); everything else is the generated inventory as written.
    """
    # The demo bundle is signed with the development key: a test site that allows it, whose
    # .site/signing.pub (the inventory's edge_bundle_public_key) is that key.
    inventory, password = _site(
        tmp_path, hosts=[site_kit.Host("box", "127.0.0.1")], public_key=DEV_PUB, allow_dev_key=True
    )
    port = free_port()
    device = {
        "ansible_connection": "local",
        "ansible_python_interpreter": "{{ ansible_playbook_python }}",
        "ansible_become": False,
        "edge_common_prefix": str(tmp_path / "box"),
        "edge_service_port": port,
        "edge_hardening_nftables_enabled": False,
        "edge_service_ip_allow": [],
        "edge_monitoring_output_dir": str(tmp_path / "prometheus"),
    }
    try:
        result = run_rollout(
            inventory,
            demo_bundle(),
            vault_password=password.read_text().strip(),
            extravars=device,
            report_dir=tmp_path / "report",
        )
        assert result.hosts["box"].endpoint == f"https://127.0.0.1:{port}"
        tokens = yaml.safe_load(_vault_view(inventory / "group_vars" / "all" / "vault.yml", password).stdout)
        context = ssl.create_default_context(cafile=str(inventory / ".site" / "ca.crt"))
        url = f"https://127.0.0.1:{port}/v2/models/demo"
        with httpx.Client(verify=context, timeout=10.0) as client:
            assert client.get(url).status_code == 401
            metrics_only = {"Authorization": f"Bearer {tokens['vault_edge_metrics_token']}"}
            assert client.get(url, headers=metrics_only).status_code == 401  # never inference
            served = client.get(url, headers={"Authorization": f"Bearer {tokens['vault_edge_token']}"})
        assert served.status_code == 200 and served.json()["name"] == "demo"
        token_file = tmp_path / "prometheus" / "dualdeploy-token"
        assert token_file.read_text().strip() == tokens["vault_edge_metrics_token"]
        assert token_file.stat().st_mode & 0o777 == 0o600
        ca_copy = (tmp_path / "prometheus" / "dualdeploy-ca.crt").read_text()
        assert ca_copy == (inventory / ".site" / "ca.crt").read_text()
        assert result.report is not None and result.report.rows[0].gate == "passed"
    finally:
        ctl = tmp_path / "box" / "bin" / "dualdeploy-ctl"
        if ctl.exists():
            subprocess.run([str(ctl), "stop"], check=False, capture_output=True, timeout=60)


def test_site_init_command_writes_a_site_and_names_the_next_steps(tmp_path: Path) -> None:
    generate_key(tmp_path / "site-signing.pem")
    args = [
        *("--site", "plant-2", "--inventories", str(tmp_path / "inventories")),
        *("--vault-password-file", str(tmp_path / "pw"), "--public-key", str(tmp_path / "site-signing.pub")),
        *("--host", "press-1=10.1.0.7", "--host", "press-2=10.1.0.8,arm64_cpu"),
    ]
    run = subprocess.run(
        [str(BIN / "python"), "-m", "deploy.site_kit", "init", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert "(new: keep a copy off this machine)" in run.stdout and "ansible/run plant-2 check" in run.stdout
    assert "warning: no --management-network" in run.stdout
    hosts = site_kit.read_hosts(tmp_path / "inventories" / "plant-2")
    assert hosts == [site_kit.Host("press-1", "10.1.0.7"), site_kit.Host("press-2", "10.1.0.8", "arm64_cpu")]
    again = subprocess.run(
        [str(BIN / "python"), "-m", "deploy.site_kit", "init", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert again.returncode == 2 and "exists" in again.stderr


def test_wrapper_names_the_missing_site_and_the_command_that_makes_it() -> None:
    run = subprocess.run(
        [str(ANSIBLE / "run"), "no-such-site", "check"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert run.returncode == 2
    assert "no site 'no-such-site'" in run.stderr and "make site-init SITE=no-such-site" in run.stderr
