"""Edge checks that need no device: ansible-lint, systemd-analyze on rendered units, the README matrix,
the rollout strategy, and the collection's pure functions on real files."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from edge_support import demo_bundle, plugin_in_child, render_template, render_unit

from contract.manifest import Manifest
from deploy.edge_rollout import ANSIBLE_DIR, REPO_ROOT, device_matrix
from serving import device

BIN = Path(sys.executable).parent
COLLECTION = ANSIBLE_DIR / "collections" / "ansible_collections" / "dualdeploy" / "edge" / "plugins"
TABLE = yaml.safe_load((REPO_ROOT / "contract" / "device_classes.yaml").read_text())


@pytest.mark.slow
def test_ansible_lint_production_profile_is_clean() -> None:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "NO_COLOR": "1"}
    run = subprocess.run(
        [str(BIN / "ansible-lint"), "--profile", "production", "--offline"],
        cwd=ANSIBLE_DIR,
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "Passed" in run.stdout + run.stderr


def test_example_site_firewall_ruleset_passes_nft_check(tmp_path: Path) -> None:
    assert shutil.which("nft"), "nft is missing: run .ci/system-packages (Debian nftables)"
    site = yaml.safe_load(
        (ANSIBLE_DIR / "inventories" / "example-site" / "group_vars" / "all" / "main.yml").read_text()
    )
    defaults = yaml.safe_load(
        (ANSIBLE_DIR / "roles" / "edge_hardening" / "defaults" / "main.yml").read_text()
    )
    variables = {**defaults, **{k: v for k, v in site.items() if k.startswith("edge_hardening_")}}
    variables.update({"_edge_hardening_table": "dualdeploy", "_edge_hardening_port": 8443})
    ruleset = render_template(
        ANSIBLE_DIR / "roles" / "edge_hardening" / "templates" / "dualdeploy.nft.j2",
        tmp_path / "dualdeploy.nft",
        variables,
    )
    text = ruleset.read_text()
    assert "policy drop" in text and "10.0.0.0/24" in text and "tcp dport { 8443 } drop" in text
    # Management networks only on their ports (DNS, NTP): no other port of theirs is reachable.
    assert "meta l4proto { tcp, udp } th dport { 53, 123 } accept" in text
    check = subprocess.run(["nft", "-c", "-f", str(ruleset)], capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stderr


@pytest.mark.parametrize("grpc_port", [0, 8081])
def test_the_firewall_opens_the_grpc_port_only_when_it_is_served(tmp_path: Path, grpc_port: int) -> None:
    """Issue 14, item 5: gRPC is off by default (nothing in the ruleset); edge_service_grpc_port opens it to
    the client networks like the REST port, and drops it for everyone else."""
    assert shutil.which("nft"), "nft is missing: run .ci/system-packages (Debian nftables)"
    defaults = yaml.safe_load(
        (ANSIBLE_DIR / "roles" / "edge_hardening" / "defaults" / "main.yml").read_text()
    )
    variables = {
        **defaults,
        "edge_hardening_management_networks": ["10.0.0.0/24"],
        "edge_hardening_client_networks": ["192.168.10.0/24"],
        "_edge_hardening_table": "dualdeploy",
        "_edge_hardening_port": 8000,
        "edge_service_grpc_port": grpc_port,
    }
    ruleset = render_template(
        ANSIBLE_DIR / "roles" / "edge_hardening" / "templates" / "dualdeploy.nft.j2",
        tmp_path / "d.nft",
        variables,
    )
    text = ruleset.read_text()
    served = "8000, 8081" if grpc_port else "8000"
    assert f"tcp dport {{ {served} }} ip saddr {{ 192.168.10.0/24 }} accept" in text
    assert f"tcp dport {{ {served} }} drop" in text
    assert ("8081" in text) == bool(grpc_port)
    check = subprocess.run(["nft", "-c", "-f", str(ruleset)], capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stderr


@pytest.mark.parametrize("escalation", ["never", "low_confidence"])
def test_the_firewall_admits_the_cloud_teacher_only_when_the_site_escalates(
    tmp_path: Path, escalation: str
) -> None:
    """Issue 13, item 3: with `never` no egress rule names the cloud; with `low_confidence` exactly the
    teacher's address and port, and the unit's IPAddressAllow= the same address."""
    assert shutil.which("nft"), "nft is missing: run .ci/system-packages (Debian nftables)"
    roles = ANSIBLE_DIR / "roles"
    common = {
        **yaml.safe_load((roles / "edge_common" / "defaults" / "main.yml").read_text()),
        **yaml.safe_load((roles / "edge_common" / "vars" / "main.yml").read_text()),
    }
    variables = {
        **common,
        **yaml.safe_load((roles / "edge_hardening" / "defaults" / "main.yml").read_text()),
        "edge_hardening_management_networks": ["10.0.0.0/24"],
        "_edge_hardening_table": "dualdeploy",
        "_edge_hardening_port": 8000,
        "edge_escalation": escalation,
        "edge_escalation_endpoint": "https://203.0.113.7:8443",
    }
    ruleset = render_template(
        roles / "edge_hardening" / "templates" / "dualdeploy.nft.j2", tmp_path / "d.nft", variables
    )
    text = ruleset.read_text()
    check = subprocess.run(["nft", "-c", "-f", str(ruleset)], capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stderr
    unit = render_unit(tmp_path / "unit", TABLE["classes"]["x86_cpu"], "x86_cpu")
    unit_vars = json.loads(unit.with_name(f"{unit.name}.vars.json").read_text())
    unit_vars.update(
        {k: v for k, v in variables.items() if k.startswith(("edge_escalation", "_edge_common"))},
        edge_service_ip_allow=["10.0.0.0/24"],
    )
    unit = render_template(
        roles / "edge_service" / "templates" / "dualdeploy.service.j2",
        tmp_path / "u.service",
        unit_vars,
        role_vars=True,
    )
    allow = next(line for line in unit.read_text().splitlines() if line.startswith("IPAddressAllow="))
    if escalation == "never":
        assert "203.0.113.7" not in text and "8443" not in text
        assert "203.0.113.7" not in allow
    else:
        assert "ip daddr 203.0.113.7 tcp dport 8443 accept" in text
        assert text.count("203.0.113.7") == 1
        assert allow.split() == ["IPAddressAllow=localhost", "127.0.0.1", "10.0.0.0/24", "203.0.113.7"]


@pytest.mark.parametrize("device_class", ["x86_cpu", "jetson"])
def test_rendered_unit_passes_systemd_analyze_verify_and_scores_ok(tmp_path: Path, device_class: str) -> None:
    missing = "systemd-analyze is missing: run .ci/system-packages (Debian systemd)"
    assert shutil.which("systemd-analyze"), missing
    unit = render_unit(tmp_path, TABLE["classes"][device_class], device_class)
    # The switch's other two units, from the same variables: the candidate and the socket that owns the port.
    variables = json.loads(unit.with_name(f"{unit.name}.vars.json").read_text())
    common = yaml.safe_load((ANSIBLE_DIR / "roles" / "edge_common" / "vars" / "main.yml").read_text())
    variables["_edge_common_cidr_pattern"] = common["_edge_common_cidr_pattern"]
    templates = ANSIBLE_DIR / "roles" / "edge_service" / "templates"
    units = tmp_path / "units"
    units.mkdir()
    main = unit.rename(units / "dualdeploy.service")
    candidate = render_template(
        templates / "dualdeploy.service.j2",
        units / "dualdeploy-next.service",
        {**variables, "_edge_service_unit_role": "candidate"},
        role_vars=True,
    )
    sock = render_template(
        templates / "dualdeploy.socket.j2", units / "dualdeploy.socket", variables, role_vars=True
    )
    for path in (main, candidate, sock):
        (path.parent / f"{path.name}.vars.json").unlink(missing_ok=True)
    assert "ListenStream=127.0.0.1:8000" in sock.read_text()
    assert "ExecStart=" in candidate.read_text() and " candidate\n" in candidate.read_text()
    assert "Restart=no" in candidate.read_text() and "WantedBy" not in candidate.read_text()
    assert "Restart=on-failure" in main.read_text() and "Type=notify" in main.read_text()
    unit = main
    text = unit.read_text()
    entry = TABLE["classes"][device_class]
    for line in (
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
        f"MemoryMax={entry['memory_max']}",
    ):
        assert line in text
    verify = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(main), str(candidate), str(sock)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr
    for service in (main, candidate):
        security = subprocess.run(
            ["systemd-analyze", "security", "--offline=true", str(service)],
            capture_output=True,
            text=True,
            check=False,
        )
        score = re.search(r"Overall exposure level for \S+: ([0-9.]+) (\w+)", security.stdout)
        assert score, security.stdout[-2000:] + security.stderr
        # systemd rates 0-10, lower is better; "OK" is its best band (below 3.0 here on every class).
        assert float(score.group(1)) < 3.0 and score.group(2) == "OK", (service.name, score.group(0))


def test_readme_device_matrix_is_generated_from_the_table() -> None:
    readme = (ANSIBLE_DIR / "README.md").read_text()
    begin, end = "<!-- device-matrix:begin -->\n", "<!-- device-matrix:end -->"
    assert begin in readme and end in readme, "ansible/README.md lost its matrix markers"
    current = readme.split(begin, 1)[1].split(end, 1)[0]
    assert current == device_matrix(), (
        "ansible/README.md's device matrix is stale: regenerate it with "
        "`python -m deploy.edge_rollout matrix`"
    )
    for name in TABLE["classes"]:
        assert f"`{name}`" in current


def test_playbook_rolls_out_canary_first_with_configurable_batches() -> None:
    plays = yaml.safe_load((ANSIBLE_DIR / "edge.yml").read_text())
    rollout = plays[0]
    assert rollout["serial"] == "{{ edge_rollout_serial | default([1, '25%', '100%']) }}"
    assert rollout["max_fail_percentage"] == "{{ edge_rollout_max_fail_percentage | default(0) }}"


def test_every_role_default_is_prefixed_and_mirrored_in_argument_specs() -> None:
    for role in sorted((ANSIBLE_DIR / "roles").iterdir()):
        defaults = yaml.safe_load((role / "defaults" / "main.yml").read_text()) or {}
        specs = yaml.safe_load((role / "meta" / "argument_specs.yml").read_text())
        options = specs["argument_specs"]["main"]["options"]
        assert set(defaults) == set(options), role.name
        # The one site-level family: issue 13 names it edge_escalation, and two roles read it (the
        # firewall and the service); edge_common defines it, with a noqa for ansible-lint's prefix rule.
        site = {n for n in defaults if role.name == "edge_common" and n.startswith("edge_escalation")}
        assert all(name.startswith(f"{role.name}_") for name in set(defaults) - site), role.name


FACT_CASES: list[tuple[dict[str, Any], str | None]] = [
    ({"arch": "x86_64"}, "x86_cpu"),
    ({"arch": "x86_64", "nvidia_gpu": True}, "nvidia_gpu"),
    ({"arch": "aarch64", "files": ["/etc/nv_tegra_release"]}, "jetson"),
    ({"arch": "aarch64", "commands": ["npu-smi"]}, "ascend"),
    ({"arch": "aarch64"}, "arm64_cpu"),
    ({"arch": "riscv64"}, None),
]


def test_device_detection_matches_the_first_class_whose_facts_hold() -> None:
    base = {"files": [], "commands": [], "nvidia_gpu": False}
    cases = [{**base, **facts} for facts, _ in FACT_CASES]
    found = plugin_in_child(
        COLLECTION / "modules" / "device_facts.py", "match", [[TABLE["classes"], c] for c in cases]
    )
    assert found == [expected for _, expected in FACT_CASES]


def test_the_playbook_and_the_server_detect_the_same_class() -> None:
    """The preflight module runs before the server is installed, so it carries its own matcher;
    both must read the one table the same way."""
    table = device.parse_table(TABLE)
    for facts, expected in FACT_CASES:
        given = device.DeviceFacts(
            arch=str(facts["arch"]),
            files=frozenset(facts.get("files", [])),
            commands=frozenset(facts.get("commands", [])),
            nvidia_gpu=bool(facts.get("nvidia_gpu", False)),
        )
        if expected is None:
            with pytest.raises(device.DeviceError, match="no device class matches"):
                device.detect_class(table, given)
        else:
            assert device.detect_class(table, given).name == expected


def test_the_collection_ships_the_server_detection_module_byte_for_byte() -> None:
    """One implementation of device and CPU detection: contract/detect.py, copied into module_utils."""
    shipped = COLLECTION / "module_utils" / "detect.py"
    assert shipped.read_bytes() == (REPO_ROOT / "contract" / "detect.py").read_bytes(), (
        "module_utils/detect.py differs from contract/detect.py: run `make sync-detect`"
    )


def test_the_preflight_module_reports_this_machines_cpu_class_like_the_server() -> None:
    (found,) = plugin_in_child(
        COLLECTION / "module_utils" / "detect.py", "gather", [[TABLE["classes"], TABLE["cpu_classes"]]]
    )
    facts = device.gather_facts(device.parse_table(TABLE), TABLE["cpu_classes"])
    assert found["cpu_class"] == facts.cpu_class is not None
    assert sorted(found["cpu_flags"]) == sorted(facts.cpu_flags)


AVX2_DEVICE = {"arch": "x86_64", "cpu_class": "x86_64_avx2", "cpu_flags": ["avx2", "fma"], "gpu_arch": None}


def _int8_manifest(validated: list[str]) -> dict[str, Any]:
    manifest = json.loads((demo_bundle() / "manifest.json").read_text())
    rows = TABLE["cpu_classes"]
    for variant in manifest["variants"]:
        if variant["name"] == "int8":
            variant["cpu"] = {
                "validated": validated,
                "results": {c: {"status": "passed", "requires": rows[c]["requires"]} for c in validated},
            }
    return manifest


CHOOSER = ANSIBLE_DIR / "roles" / "edge_bundle" / "files" / "choose_variant.py"


def _chooser() -> Any:
    """The controller-side chooser, imported from its file (it imports only the contract package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("choose_variant", CHOOSER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _choose(manifest: dict[str, Any], device_class: str, found: dict[str, Any]) -> dict[str, Any]:
    chooser = _chooser()
    return dict(chooser.choose(Manifest.parse(manifest), device_class, TABLE["classes"][device_class], found))


def test_preflight_refuses_a_bundle_with_nothing_validated_for_the_device_cpu_naming_the_features(
    tmp_path: Path,
) -> None:
    vnni_only = _int8_manifest(["x86_64_avx512_vnni"])
    vnni_only["variants"] = [v for v in vnni_only["variants"] if v["name"] == "int8"]
    (tmp_path / "manifest.json").write_text(json.dumps(vnni_only))
    run = subprocess.run(
        [
            sys.executable,
            str(CHOOSER),
            str(tmp_path),
            "--device-class",
            "x86_cpu",
            "--class-entry",
            json.dumps(TABLE["classes"]["x86_cpu"]),
            "--found",
            json.dumps(AVX2_DEVICE),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert run.returncode == 1
    assert "nothing validated for this device's CPU" in run.stderr
    assert "x86_64_avx512_vnni (this CPU lacks avx512bw, avx512_vnni)" in run.stderr


def test_preflight_notes_an_int8_variant_the_device_cpu_will_not_serve() -> None:
    served = _choose(_int8_manifest(["x86_64_avx2"]), "x86_cpu", AVX2_DEVICE)
    set_aside = _choose(_int8_manifest(["x86_64_avx512_vnni"]), "x86_cpu", AVX2_DEVICE)
    assert served["variant"] == "auto" and served["cpu_note"] == ""
    assert set_aside["variant"] == "auto"
    assert "int8: not validated for this CPU class x86_64_avx2" in set_aside["cpu_note"]


def test_jetson_without_an_engine_for_its_gpu_runs_onnx_on_the_tensorrt_ep_with_a_cache() -> None:
    manifest = json.loads((demo_bundle() / "manifest.json").read_text())
    engine = {
        "name": "trt-sm_87-fp16",
        "file": "e.onnx",
        "format": "tensorrt",
        "precision": "fp16",
        "device_classes": ["jetson"],
        "tolerance": {"kind": "top1", "min_agreement": 0.99},
        "gpu_arch": "sm_87",
    }
    with_engine = {**manifest, "variants": [*manifest["variants"], engine]}
    orin = {"arch": "aarch64", "gpu_arch": "sm_87"}
    choice = _choose(manifest, "jetson", orin)
    with_engine_choice = _choose(with_engine, "jetson", orin)
    x86_choice = _choose(manifest, "x86_cpu", {"arch": "x86_64"})
    onnx_names = {v["name"] for v in manifest["variants"] if v["format"] == "onnx"}
    assert choice["variant"] in onnx_names and choice["trt_engine_cache"] is True
    assert with_engine_choice["variant"] == "auto"
    assert x86_choice == {
        "variant": "auto",
        "trt_engine_cache": False,
        "reason": "the server picks from the table",
        "cpu_note": x86_choice["cpu_note"],
    }
    # Called without CPU facts, as this test does, no INT8 counts as validated for the device.
    assert x86_choice["cpu_note"].startswith(
        "int8: this CPU (x86_64, features none known) is of no CPU class"
    )


def test_example_site_inventory_opens_with_its_vault_password(tmp_path: Path) -> None:
    secret = tmp_path / "vault-pass"
    secret.write_text("example-site-vault-password")  # documented in ansible/README.md: example only
    listing = subprocess.run(
        [
            str(BIN / "ansible-inventory"),
            "-i",
            "inventories/example-site",
            "--vault-password-file",
            str(secret),
            "--host",
            "line-2-orin",
        ],
        cwd=ANSIBLE_DIR,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "ANSIBLE_CONFIG": str(ANSIBLE_DIR / "ansible.cfg")},
    )
    host = json.loads(listing.stdout)
    assert host["edge_service_tls_enabled"] and host["edge_hardening_nftables_enabled"]
    assert host["vault_edge_token"] and "BEGIN CERTIFICATE" in host["vault_edge_tls_cert"]
    assert host["edge_service_health_timeout"] == 900  # group_vars/jetson.yml
    groups = json.loads(
        subprocess.run(
            [
                str(BIN / "ansible-inventory"),
                "-i",
                "inventories/example-site",
                "--vault-password-file",
                str(secret),
                "--list",
            ],
            cwd=ANSIBLE_DIR,
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "ANSIBLE_CONFIG": str(ANSIBLE_DIR / "ansible.cfg")},
        ).stdout
    )
    assert set(groups["edge"]["children"]) == {"x86_cpu", "jetson", "ascend"}
    assert set(groups["edge"]["children"]) <= set(TABLE["classes"])


def test_monitoring_files_quote_every_inventory_value(tmp_path: Path) -> None:
    """The scrape snippet (YAML) and targets file (JSON) keep hostile inventory values as plain strings."""
    site = 'ward "3"\n  - job_name: injected'
    job = "dualdeploy: edge\n- job_name: x"
    hosts = [
        {
            "inventory_hostname": 'box"1',
            "edge_service_endpoint": "https://10.0.0.5:8443",
            "edge_service_result": {"device_class": "x86_cpu", "model": "demo\n"},
        }
    ]
    variables = {
        "edge_monitoring_job": job,
        "edge_monitoring_site": site,
        "edge_monitoring_scrape_interval": "15s",
        "edge_monitoring_ca_file": "/etc/prometheus/ca #.crt",
        "edge_monitoring_token_file": "/etc/prometheus/token: x",
        "edge_monitoring_output_dir": "/srv/file_sd",
        "_edge_monitoring_tls": True,
        "_edge_monitoring_token": True,
        "_edge_monitoring_hosts": hosts,
    }
    templates = ANSIBLE_DIR / "roles" / "edge_monitoring" / "templates"
    scrape = yaml.safe_load(
        render_template(templates / "scrape.yml.j2", tmp_path / "scrape.yml", variables).read_text()
    )
    assert len(scrape) == 1 and scrape[0]["job_name"] == job
    assert scrape[0]["tls_config"]["ca_file"] == "/etc/prometheus/ca #.crt"
    assert scrape[0]["authorization"]["credentials_file"] == "/etc/prometheus/token: x"
    assert scrape[0]["file_sd_configs"][0]["files"] == [f"/srv/file_sd/{job}.json"]
    targets = json.loads(
        render_template(templates / "targets.json.j2", tmp_path / "t.json", variables).read_text()
    )
    assert targets == [
        {
            "targets": ["10.0.0.5:8443"],
            "labels": {"instance": 'box"1', "site": site, "device_class": "x86_cpu", "model": "demo\n"},
        }
    ]
