"""Suite-wide guard: no test imports Ansible's module code into the test process.

``ansible.module_utils`` patches ``sys.intern`` and ``dataclasses`` for the whole process when it is
imported. Every later test that exports a model with torch then fails far from the cause
("substitute_in_graph expects a function but got ... SysInternPatch"), and only in a full run,
because module order decides it. Plugins and modules run in their own process on a device; a test
calls them the same way (``edge_support.plugin_in_child``). This guard fails the test that broke
the rule, by name, instead of the innocent ones after it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest

_PATCHING_PACKAGE = "ansible.module_utils"


@pytest.fixture(autouse=True)
def _ansible_module_code_stays_out_of_this_process() -> Iterator[None]:
    already = _PATCHING_PACKAGE in sys.modules
    yield
    if not already and _PATCHING_PACKAGE in sys.modules:
        pytest.fail(
            f"this test imported {_PATCHING_PACKAGE} into the test process, which patches sys.intern for "
            "every later test (torch's exporter then fails); call the plugin through "
            "edge_support.plugin_in_child instead",
            pytrace=False,
        )
