"""The dualdeploy CrossGuard policy pack: ``pulumi preview --policy-pack policy``.

The rules live in ``dualdeploy_rules.py`` as plain validation functions so that tests can
call them; this file only serves them to the Pulumi engine (``PolicyPack`` blocks, serving
the analyzer over gRPC, so nothing else belongs here).
"""

from dualdeploy_rules import POLICIES
from pulumi_policy import EnforcementLevel, PolicyPack

PolicyPack(name="dualdeploy", enforcement_level=EnforcementLevel.MANDATORY, policies=list(POLICIES))
