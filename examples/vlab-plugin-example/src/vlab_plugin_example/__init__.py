"""Example plugins for vesuvius-lab, registered through entry points (see pyproject.toml)."""
