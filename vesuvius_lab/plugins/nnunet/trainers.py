"""Finding nnU-Net trainer classes: statically (cheap, for ``vlab validate``) and by import (for training).

A trainer is named as nnU-Net names it (a class defined under ``nnunetv2/training/nnUNetTrainer``,
or under a folder of the ``nnUNet_extTrainer`` environment variable, found the way
``nnUNetv2_train -tr`` finds it), by the name of a trainer shipped with this plugin (the classes
in :mod:`vesuvius_lab.plugins.nnunet.trainer_classes`, e.g. ``nnUNetTrainerSkeletonRecall``), or
as ``package.module:Class`` for a subclass in the user's own code.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
from functools import cache
from pathlib import Path

from vesuvius_lab.core.errors import UserError
from vesuvius_lab.core.registry import suggest

_CLASS = re.compile(r"^class\s+(\w+)\s*[(:]", re.MULTILINE)
BASE_TRAINER = "nnUNetTrainer"


TRAINER_PACKAGE = "nnunetv2.training.nnUNetTrainer"


@cache
def builtin_trainer_modules() -> dict[str, str]:
    """Class name -> module for the classes in nnunetv2's trainer package, read from the sources."""
    spec = importlib.util.find_spec(TRAINER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return {}
    modules: dict[str, str] = {}
    for folder in map(Path, spec.submodule_search_locations):
        for source in sorted(folder.rglob("*.py")):
            module = ".".join((TRAINER_PACKAGE, *source.relative_to(folder).with_suffix("").parts))
            for name in _CLASS.findall(source.read_text(errors="replace")):
                modules.setdefault(name, module)
    return modules


def builtin_trainer_names() -> tuple[str, ...]:
    return tuple(sorted(builtin_trainer_modules()))


#: The package of the trainers shipped with this plugin.
PLUGIN_TRAINER_PACKAGE = "vesuvius_lab.plugins.nnunet.trainer_classes"


@cache
def plugin_trainer_modules() -> dict[str, str]:
    """Class name -> module for the trainers shipped with this plugin, read from the sources."""
    folder = Path(__file__).resolve().parent / "trainer_classes"
    modules: dict[str, str] = {}
    for source in sorted(folder.glob("*.py")):
        if source.stem != "__init__":
            for name in _CLASS.findall(source.read_text(errors="replace")):
                if name.startswith("nnUNetTrainer"):
                    modules.setdefault(name, f"{PLUGIN_TRAINER_PACKAGE}.{source.stem}")
    return modules


#: nnU-Net's variable naming extra folders (os.pathsep-separated) searched for trainers by class name.
EXTERNAL_TRAINERS_VARIABLE = "nnUNet_extTrainer"


def external_trainer_names() -> set[str]:
    """Class names defined in the .py files under the folders of ``nnUNet_extTrainer``, read statically."""
    names: set[str] = set()
    for folder in os.environ.get(EXTERNAL_TRAINERS_VARIABLE, "").split(os.pathsep):
        if folder.strip() and Path(folder).is_dir():
            for source in Path(folder).rglob("*.py"):
                try:
                    names.update(_CLASS.findall(source.read_text(errors="replace")))
                except OSError:
                    continue
    return names


def trainer_problem(name: str) -> str | None:
    """Why ``name`` cannot be a trainer class, or None. nnU-Net's own and ``nnUNet_extTrainer`` trainers
    are found by reading sources (nothing is imported); a ``package.module:Class`` module is imported."""
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            found = importlib.util.find_spec(module) if module else None
        except (ImportError, ValueError):
            found = None
        if found is None:
            return (f'module "{module}" of trainer "{name}" cannot be found. Install the package that holds it, '
                    'or name one of nnU-Net\'s trainers, e.g. "nnUNetTrainer".')
        if not attr.isidentifier():
            return (f'trainer "{name}" names no class after the colon. Write it as "package.module:Class", '
                    'e.g. "my_package.trainers:MyTrainer".')
        return _imported_trainer_problem(module, attr)
    known = builtin_trainer_names()
    if name in known or not known or name in plugin_trainer_modules() or name in external_trainer_names():
        return None
    trainers = [n for n in (*known, *plugin_trainer_modules()) if "Trainer" in n]
    return (f'nnU-Net has no trainer class "{name}".{suggest(name, trainers)} Use a class from '
            'nnunetv2.training.nnUNetTrainer (e.g. "nnUNetTrainer", "nnUNetTrainerNoMirroring"), one shipped '
            f'with this plugin ({", ".join(sorted(plugin_trainer_modules()))}), your own subclass as '
            f'"package.module:Class", or a class in a folder named by {EXTERNAL_TRAINERS_VARIABLE}.')


def _imported_trainer_problem(module: str, attr: str) -> str | None:
    """Import the user's module (training imports it too) and look for a trainer class ``attr`` there;
    a class merely imported into the module counts, as it does for training."""
    try:
        found = getattr(importlib.import_module(module), attr, None)
    except Exception as exc:  # the user's module: any failure to import it is the problem to report
        return (f'importing module "{module}" failed ({type(exc).__name__}: {exc}). Fix that module or name '
                'another trainer.')
    if found is None:
        return f'module "{module}" has no class "{attr}". Check the trainer name ("package.module:Class").'
    if not (isinstance(found, type) and any(base.__name__ == BASE_TRAINER for base in found.__mro__)):
        return f'"{module}:{attr}" is not a subclass of {BASE_TRAINER}. Name an nnU-Net trainer class.'
    return None


def trainer_class(name: str) -> type:
    """Import the trainer class named ``name``; a :class:`UserError` if it is missing or not a trainer."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            found = getattr(importlib.import_module(module), attr, None)
        except ImportError as exc:
            raise UserError(f'trainer "{name}": importing {module} failed ({exc}). Install or fix that module.') \
                from None
    elif name in builtin_trainer_modules():  # import its one module, not the whole trainer tree
        found = getattr(importlib.import_module(builtin_trainer_modules()[name]), name, None)
    elif name in plugin_trainer_modules():
        found = getattr(importlib.import_module(plugin_trainer_modules()[name]), name, None)
    else:  # nnU-Net's own search, which also honours nnUNet_extTrainer
        from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

        try:
            found = recursive_find_trainer_class_by_name(name)
        except RuntimeError:
            found = None
    if not (isinstance(found, type) and issubclass(found, nnUNetTrainer)):
        problem = trainer_problem(name) or f'"{name}" is not a subclass of nnUNetTrainer.'
        raise UserError(f"params.trainer: {problem}")
    return found
