"""Pulumi ComponentResources, one a module (see STYLE.md, "Pulumi components").

What it owns: each component, its ``<Name>Args`` and its private helpers, and nothing else. The
provider-neutral ones sit here (``model_service.py`` with ``k8s_specs.py``, ``edge_fleet.py``);
everything that names an AWS service sits behind the seam ``components/aws/``.

What it may import: ``pulumi`` and its provider SDKs, ``contract/``, and ``deploy.edge_rollout``
(the ansible-runner driver that ``EdgeFleet`` runs, exactly as ``make edge`` does). Never
``deploy.config`` or ``deploy.render`` (they import the components), ``serving/`` or
``model_build/``. Components never read ``pulumi.Config`` or ``os.environ``: ``__main__.py`` hands
them their Args from ``deploy/config.py``.
"""
