"""Inventory values that reach a shell script, a systemd unit, a supervisord or an nftables file are
checked before anything changes on a device, or quoted where they are written.

The refusals run the real playbook (ansible-runner, one local-connection device) with one hostile value
each and expect a message that names the variable and the value; the device's prefix is never created.
The acceptances render the real templates with awkward but legal values and run or verify the result:
the server's start script under sh, the unit under ``systemd-analyze verify``.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from edge_support import (
    ANSIBLE,
    DEV_PUB,
    Device,
    demo_bundle,
    render_template,
    render_unit,
    run_ansible,
    write_inventory,
)
from serving_support import free_port

from components.edge_fleet import escalation_extravars
from deploy.edge_rollout import RolloutError, run_rollout

pytestmark = pytest.mark.slow

ROLES = ANSIBLE / "roles"
# What the start script's template sees from the roles' defaults (edge_common's escalation settings,
# edge_service's own); a test's variables override them.
ROLE_DEFAULTS: dict[str, Any] = {
    **yaml.safe_load((ROLES / "edge_common" / "defaults" / "main.yml").read_text()),
    **yaml.safe_load((ROLES / "edge_common" / "vars" / "main.yml").read_text()),
    **yaml.safe_load((ROLES / "edge_service" / "defaults" / "main.yml").read_text()),
}
TABLE = yaml.safe_load((ANSIBLE.parent / "contract" / "device_classes.yaml").read_text())
MEMORY_PATTERN = yaml.safe_load((ROLES / "edge_service" / "vars" / "main.yml").read_text())[
    "_edge_service_memory_pattern"
]


def _refused(tmp_path: Path, prefix: Path | None = None, **host_vars: Any) -> str:
    """Roll the demo bundle out to one device with ``host_vars``; return the refusal's message."""
    device = Device("box", prefix or tmp_path / "box", free_port(), extra=host_vars)
    inventory = write_inventory(tmp_path / "hosts.yml", [device])
    with pytest.raises(RolloutError) as caught:
        run_rollout(inventory, demo_bundle(), public_key=DEV_PUB)
    message = str(caught.value)
    assert "box failed" in message, message
    assert not device.prefix.exists(), "the device changed before the preconditions failed"
    return message


# --------------------------------------------------------------------------- refused


@pytest.mark.parametrize(
    "name",
    ["with space", "semi;colon", "dollar$(touch pwned)", "new\nline", 'quote"d', "per%cent"],
    ids=["space", "semicolon", "command-substitution", "newline", "quote", "percent"],
)
def test_prefix_with_shell_or_unit_syntax_is_refused_naming_it(tmp_path: Path, name: str) -> None:
    prefix = tmp_path / name
    message = _refused(tmp_path, prefix=prefix)
    assert f"edge_common_prefix={json.dumps(str(prefix))} is refused" in message
    assert "absolute path" in message
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()


def test_relative_prefix_is_refused_naming_it(tmp_path: Path) -> None:
    message = _refused(tmp_path, prefix=Path("relative/prefix"))
    assert 'edge_common_prefix="relative/prefix" is refused' in message


@pytest.mark.parametrize(
    "instance", ["dualdeploy;reboot", "dual deploy", "-dualdeploy", "a\nExecStart=/bin/sh"]
)
def test_instance_name_outside_unit_name_syntax_is_refused(tmp_path: Path, instance: str) -> None:
    message = _refused(tmp_path, edge_common_instance=instance)
    assert f"edge_common_instance={json.dumps(instance)} is refused" in message


def test_service_user_that_would_add_a_unit_line_is_refused(tmp_path: Path) -> None:
    user = "root\nExecStartPre=/bin/sh"
    message = _refused(tmp_path, edge_common_service_user=user)
    assert f"edge_common_service_user={json.dumps(user)} is refused" in message


def test_extra_env_name_with_shell_syntax_is_refused_naming_only_the_bad_names(tmp_path: Path) -> None:
    message = _refused(
        tmp_path, edge_service_extra_env={"A;rm -rf /": "1", "1ABC": "2", "GOOD_NAME": "3", "_ok": "4"}
    )
    assert "edge_service_extra_env is refused" in message
    assert 'not environment variable names: ["1ABC", "A;rm -rf /"]' in message
    assert "GOOD_NAME" not in message and "_ok" not in message


def test_extra_env_that_is_not_a_mapping_is_refused(tmp_path: Path) -> None:
    message = _refused(tmp_path, edge_service_extra_env="FOO=bar; rm -rf /")
    assert "edge_service_extra_env is refused: it must map names to values" in message


@pytest.mark.parametrize("memory", ["2G\nExecStartPre=/bin/sh", "2 GB"])
def test_memory_limit_outside_systemd_syntax_is_refused(tmp_path: Path, memory: str) -> None:
    message = _refused(tmp_path, edge_service_memory_max=memory)
    assert f"edge_service_memory_max={json.dumps(memory)} is refused" in message
    assert "MemoryMax" in message


@pytest.mark.parametrize("port", ["8000; rm -rf /", "65536"])
def test_port_outside_the_tcp_range_is_refused(tmp_path: Path, port: str) -> None:
    message = _refused(tmp_path, edge_service_port=port)
    assert f"edge_service_port={json.dumps(port)} is refused" in message


def test_bind_address_with_an_extra_argument_is_refused(tmp_path: Path) -> None:
    message = _refused(tmp_path, edge_service_bind_address="127.0.0.1 --reload")
    assert 'edge_service_bind_address="127.0.0.1 --reload" is refused' in message


def test_firewall_network_that_would_inject_a_rule_is_refused(tmp_path: Path) -> None:
    hostile = "10.0.0.0/8 } accept; chain evil {"
    message = _refused(
        tmp_path,
        edge_hardening_nftables_enabled=True,
        edge_hardening_management_networks=["10.0.0.0/24"],
        edge_hardening_client_networks=["10.20.0.0/16", hostile],
        edge_hardening_nftables_file=str(tmp_path / "dualdeploy.nft"),
    )
    assert "edge_hardening_client_networks is refused" in message
    assert json.dumps([hostile]) in message and "10.20.0.0/16" not in message


def test_firewall_file_that_would_break_the_include_line_is_refused(tmp_path: Path) -> None:
    path = str(tmp_path / 'x".nft')
    message = _refused(
        tmp_path,
        edge_hardening_nftables_enabled=True,
        edge_hardening_management_networks=["10.0.0.0/24"],
        edge_hardening_nftables_file=path,
    )
    assert f"edge_hardening_nftables_file={json.dumps(path)} is refused" in message


def test_device_interpreter_with_arguments_is_refused(tmp_path: Path) -> None:
    message = _refused(tmp_path, edge_runtime_python="/usr/bin/python3 -I")
    assert 'edge_runtime_python="/usr/bin/python3 -I" is refused' in message


# --------------------------------------------------------------------------- accepted


def test_awkward_but_legal_settings_pass_the_real_preflight(tmp_path: Path) -> None:
    """Every preflight check of edge.yml, on values at the edges of what is allowed; nothing changes."""
    device = Device(
        "box",
        tmp_path / "pre+fix@1.0_a-b",
        65535,
        extra={
            "edge_common_instance": "dualdeploy-2.a_b",
            "edge_service_bind_address": "::1",
            "edge_service_memory_max": "infinity",
            "edge_service_extra_env": {"_X1": "a b'c\"$(touch pwned)\n", "DUALDEPLOY_LOG": ""},
        },
    )
    inventory = write_inventory(tmp_path / "hosts.yml", [device])
    run = run_ansible(
        "ansible-playbook",
        str(ANSIBLE / "edge.yml"),
        *("-i", str(inventory), "--tags", "preflight"),
        *("-e", f"edge_bundle_dir={demo_bundle()}", "-e", f"edge_bundle_public_key={DEV_PUB}"),
    )
    assert re.search(r"box\s+: ok=\d+\s+changed=0\s+unreachable=0\s+failed=0", run.stdout), run.stdout[-2000:]
    assert not device.prefix.exists()


HOSTILE_VALUES = {
    "SPACES": "a b  c",
    "QUOTES": 'it\'s "quoted"',
    "SUBSTITUTION": "$(touch {pwned}) `touch {pwned}`",
    "SEPARATORS": "; touch {pwned} && touch {pwned} | touch {pwned}",
    "NEWLINE": "first\ntouch {pwned}",
    "EMPTY": "",
}


def _start_script(tmp_path: Path, prefix: Path, **variables: Any) -> Path:
    """The role's serve.sh for a supervised x86 device under ``prefix``, rendered by Ansible."""
    rendered = {
        **ROLE_DEFAULTS,
        "_edge_service_manager": "supervised",
        "edge_common_prefix": str(prefix),
        "edge_common_instance": "dualdeploy",
        "edge_service_bind_address": "127.0.0.1",
        "edge_service_port": 8470,
        "edge_service_tls_enabled": False,
        "edge_service_token_enabled": False,
        "edge_preflight_device": {"device_class": "x86_cpu", "entry": TABLE["classes"]["x86_cpu"]},
        "edge_bundle_release": {"choice": {"trt_engine_cache": False, "variant": "auto"}},
        **variables,
    }
    template = ROLES / "edge_service" / "templates" / "serve.sh.j2"
    return render_template(template, tmp_path / "serve.sh", rendered, role_vars=True)


@pytest.mark.parametrize("manager", ["supervised", "systemd"])
def test_start_script_serves_grpc_on_the_site_address_only_when_asked(tmp_path: Path, manager: str) -> None:
    """edge_service_grpc_port: both the serving release and a candidate get --grpc-port on the bind address
    (under systemd --host is the gate's loopback, so --grpc-host names the site address)."""
    (tmp_path / "off").mkdir()
    (tmp_path / "on").mkdir()
    off = _start_script(tmp_path / "off", tmp_path / "prefix", _edge_service_manager=manager).read_text()
    assert "--grpc" not in off
    on = _start_script(
        tmp_path / "on",
        tmp_path / "prefix",
        _edge_service_manager=manager,
        edge_service_bind_address="192.168.10.5",
        edge_service_grpc_port=8081,
    ).read_text()
    assert "--grpc-host 192.168.10.5 --grpc-port 8081" in on


def test_a_grpc_port_that_is_the_gate_port_is_refused_naming_both(tmp_path: Path) -> None:
    message = _refused(tmp_path, edge_service_grpc_port=8001)
    assert "edge_service_grpc_port=8001 is refused" in message and "edge_service_gate_port (8001)" in message


def test_start_script_passes_extra_env_values_through_verbatim(tmp_path: Path) -> None:
    """serve.sh, rendered by the role's template and run by sh: each value arrives byte for byte."""
    pwned = tmp_path / "pwned"
    values = {k: v.format(pwned=pwned) for k, v in HOSTILE_VALUES.items()}
    prefix = tmp_path / "prefix"
    (prefix / "releases" / "v1").mkdir(parents=True)
    (prefix / "app" / "v1").mkdir(parents=True)
    (prefix / "current").symlink_to("releases/v1")
    (prefix / "app" / "current").symlink_to("v1")
    (prefix / "venv" / "bin").mkdir(parents=True)
    # The server's python, replaced by one that reports what it was started with.
    python = prefix / "venv" / "bin" / "python"
    python.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        "print(json.dumps({'argv': sys.argv[1:], 'env': dict(os.environ)}))\n"
    )
    python.chmod(0o755)
    script = _start_script(tmp_path, prefix, edge_service_extra_env=values)
    run = subprocess.run(["sh", str(script)], capture_output=True, text=True, check=False, timeout=60)
    assert run.returncode == 0, run.stderr
    started = json.loads(run.stdout)
    assert {k: started["env"][k] for k in values} == values
    assert started["argv"][:2] == ["-m", "serving"]
    assert started["argv"][started["argv"].index("--bundle") + 1] == str(
        (prefix / "releases" / "v1").resolve()
    )
    assert not pwned.exists()


@pytest.mark.parametrize("memory", ["512M", "1.5G", "1073741824", "50%", "12.5%", "infinity"])
def test_memory_limits_the_check_accepts_are_ones_systemd_parses(tmp_path: Path, memory: str) -> None:
    assert shutil.which("systemd-analyze"), "systemd-analyze is missing: run .ci/system-packages"
    assert re.fullmatch(MEMORY_PATTERN, memory)
    unit = render_unit(tmp_path, TABLE["classes"]["x86_cpu"], "x86_cpu", memory_max=memory)
    assert f"\nMemoryMax={memory}\n" in unit.read_text()
    verify = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True, check=False
    )
    assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr


@pytest.mark.parametrize("memory", ["2 GB", "150%", "0", "2g", "99.999%"])
def test_memory_limits_systemd_would_ignore_are_refused_by_the_check(tmp_path: Path, memory: str) -> None:
    """systemd ignores a MemoryMax it cannot parse and runs the service unlimited: the check refuses it."""
    assert shutil.which("systemd-analyze"), "systemd-analyze is missing: run .ci/system-packages"
    assert not re.fullmatch(MEMORY_PATTERN, memory)
    unit = render_unit(tmp_path, TABLE["classes"]["x86_cpu"], "x86_cpu", memory_max=memory)
    verify = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True, check=False
    )
    assert "memory limit" in verify.stderr.lower() and "ignoring" in verify.stderr, verify.stderr


# --------------------------------------------------------------------------- the cascade (issue 13, item 3)


# A site that escalates, with every setting present (a PEM-shaped CA; the rollout stops before using it).
ESCALATING: dict[str, Any] = {
    "edge_escalation": "low_confidence",
    "edge_escalation_endpoint": "https://10.9.9.9:8443",
    "edge_escalation_token": "t" * 32,
    "edge_escalation_ca": "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
}


def test_escalation_choice_outside_never_and_low_confidence_is_refused(tmp_path: Path) -> None:
    message = _refused(tmp_path, edge_escalation="always")
    # The role's argument spec (choices) refuses it before any task runs.
    assert "value of edge_escalation must be one of: never, low_confidence, got: always" in message


def test_low_confidence_without_endpoint_token_and_ca_names_each_missing_variable(tmp_path: Path) -> None:
    message = _refused(
        tmp_path, edge_escalation="low_confidence", edge_escalation_endpoint="http://10.9.9.9:443"
    )
    assert "edge_escalation=low_confidence needs" in message
    for name in ("edge_escalation_endpoint", "edge_escalation_token", "edge_escalation_ca"):
        assert name in message.split("needs", 1)[1].split(":", 1)[0], (name, message)


def test_low_confidence_with_a_host_name_and_no_addresses_is_refused(tmp_path: Path) -> None:
    message = _refused(
        tmp_path, **{**ESCALATING, "edge_escalation_endpoint": "https://teacher.example.com:8443"}
    )
    assert "list the teacher's addresses in edge_escalation_addresses" in message


def test_low_confidence_with_a_bundle_without_a_cascade_is_refused(tmp_path: Path) -> None:
    message = _refused(tmp_path, **ESCALATING)
    assert "has no cascade section" in message


def test_the_variables_the_hybrid_stack_passes_pass_the_roles_escalation_checks(tmp_path: Path) -> None:
    """EdgeFleet's escalation (issue 13, item 4) reaches the role as extra variables over an inventory
    that says nothing: the endpoint on the NLB's address and port 443, the CA and a 48-character token
    pass every escalation check, and the rollout goes on to the bundle (the demo has no cascade)."""
    props = {
        "escalation": {"endpoint": "https://198.51.100.66:443", "ca": ESCALATING["edge_escalation_ca"]},
        "escalation_token": "a" * 48,  # RandomPassword(length=48, special=False)
    }
    device = Device("box", tmp_path / "box", free_port())
    inventory = write_inventory(tmp_path / "hosts.yml", [device])
    with pytest.raises(RolloutError) as caught:
        run_rollout(inventory, demo_bundle(), public_key=DEV_PUB, extravars=escalation_extravars(props))
    message = str(caught.value)
    assert "has no cascade section" in message, message
    assert "needs" not in message and "edge_escalation_addresses" not in message, message
    assert "a" * 48 not in message


# --------------------------------------------------------------------------- tuned settings (issue 15)


def test_start_script_hands_the_tuned_settings_of_its_class_to_the_server(tmp_path: Path) -> None:
    """serve.sh reads make tune's sidecar through the real `python -m serving.tune env` (the device's class,
    checked against the release's bundle) and the server's process gets the DUALDEPLOY_* settings."""
    bundle = demo_bundle()
    prefix = tmp_path / "prefix"
    (prefix / "releases").mkdir(parents=True)
    (prefix / "releases" / "v1").symlink_to(bundle)
    (prefix / "app").mkdir()
    (prefix / "app" / "v1").symlink_to(ANSIBLE.parent)
    (prefix / "current").symlink_to("releases/v1")
    (prefix / "app" / "current").symlink_to("v1")
    (prefix / "venv" / "bin").mkdir(parents=True)
    (prefix / "etc").mkdir()
    model = json.loads((bundle / "manifest.json").read_text())["model"]
    (prefix / "etc" / "tuned.yaml").write_text(
        yaml.safe_dump(
            {
                "schema_version": 1,
                "model": model,
                "classes": {
                    "x86_cpu": {
                        "settings": {
                            "max_batch_size": 2,
                            "max_queue_delay_ms": 0.5,
                            "threads": 1,
                            "instances": 2,
                        }
                    },
                    "jetson": {"settings": {"max_batch_size": 8, "max_queue_delay_ms": 9.0, "threads": 4}},
                },
            }
        )
    )
    # The device's python: the real one for the tuner, one that reports its environment for the server.
    python = prefix / "venv" / "bin" / "python"
    python.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        "if sys.argv[1:3] == ['-m', 'serving.tune']:\n"
        f"    os.execv({sys.executable!r}, [{sys.executable!r}, *sys.argv[1:]])\n"
        "print(json.dumps({'argv': sys.argv[1:], 'env': dict(os.environ)}))\n"
    )
    python.chmod(0o755)
    script = _start_script(tmp_path, prefix)
    run = subprocess.run(["sh", str(script)], capture_output=True, text=True, check=False, timeout=120)
    assert run.returncode == 0, run.stderr
    env = json.loads(run.stdout)["env"]
    tuned = {
        k: env.get(k)
        for k in (
            "DUALDEPLOY_MAX_BATCH_SIZE",
            "DUALDEPLOY_MAX_QUEUE_DELAY_MS",
            "DUALDEPLOY_THREADS",
            "DUALDEPLOY_INSTANCES",
        )
    }
    assert tuned == {
        "DUALDEPLOY_MAX_BATCH_SIZE": "2",
        "DUALDEPLOY_MAX_QUEUE_DELAY_MS": "0.5",
        "DUALDEPLOY_THREADS": "1",
        "DUALDEPLOY_INSTANCES": "2",
    }
    # A sidecar with a safety bound in it stops the start, naming the key.
    (prefix / "etc" / "tuned.yaml").write_text(
        yaml.safe_dump(
            {"schema_version": 1, "model": model, "classes": {"x86_cpu": {"settings": {"max_queue": 10**6}}}}
        )
    )
    refused = subprocess.run(["sh", str(script)], capture_output=True, text=True, check=False, timeout=120)
    assert refused.returncode != 0 and "max_queue" in refused.stderr, refused.stderr
