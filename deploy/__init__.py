"""The operator's command-line tools and drivers, beside the Pulumi program rather than inside it.

What it owns:

- ``config.py``: stack config loading. It reads a stack's ``dualdeploy:*`` keys once, checks them
  (a bad stack stops naming the key path) and returns the components' own Args, which
  ``__main__.py`` passes to the components unchanged.
- ``render.py``: ``make render STACK=...``, the model service's Kubernetes objects written offline
  from the same Args and spec functions the component uses.
- ``edge_rollout.py``: the edge rollout through ansible-runner (``make edge``, ``edge-stop``, the
  README's device matrix, the smoke client); the ``EdgeFleet`` component drives the same function.
- ``checkov-skips.yaml``: the checkov checks skipped for the rendered objects, each with its reason.

What it may import: ``contract/`` and ``components/``. ``edge_rollout.py`` imports ``contract/``
only, because ``components/edge_fleet.py`` imports it. Nothing in ``serving/`` or ``model_build/``
imports this package, and the serving image's build context leaves it out (``.dockerignore``).
"""
