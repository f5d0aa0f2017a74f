"""Pulumi ComponentResources, one a module (see STYLE.md, "Pulumi components")."""
