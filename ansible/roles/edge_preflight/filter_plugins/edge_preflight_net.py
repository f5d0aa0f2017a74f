"""Filters of the edge preflight: is an address inside any of a list of networks (standard library only)."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any


def address_in_networks(address: str, networks: Iterable[str]) -> bool:
    """True when ``address`` (IPv4 or IPv6) lies in one of ``networks`` (CIDRs or single addresses).

    An address that is not an IP address (empty, a host name) is in no network.
    """
    try:
        ip = ipaddress.ip_address(str(address).strip())
    except ValueError:
        return False
    for net in networks:
        try:
            if ip in ipaddress.ip_network(str(net), strict=False):
                return True
        except ValueError:
            continue  # edge_hardening's own preflight names a malformed network
    return False


class FilterModule:
    """Ansible's entry point for the filters above."""

    def filters(self) -> dict[str, Any]:
        return {"edge_preflight_address_in_networks": address_in_networks}
