"""Configuration: what an experiment is, before anything runs.

The typed spec of experiment files and ``vesuvius.toml`` (pydantic, unknown keys forbidden),
loading an experiment (``extends`` chains, ``--set`` overrides, every problem reported with its
file, line and key path), the TOML key positions behind those line numbers, the project settings
and their precedence, and ``[sweep]`` grids expanded into experiments. Every command reads an
experiment file through one entry, :func:`vesuvius_lab.core.config.checked.read_experiment`, which
makes every check ``vlab validate`` makes.

May import: the root of core (registry, errors, files, console, interrupts) and ``contract``.
"""
