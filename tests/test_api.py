"""The public API: everything public in the modules is re-exported, and nothing else."""

from __future__ import annotations

import importlib
import pkgutil

import mailkit

PUBLIC_MODULES = [
    "mailkit.analytics",
    "mailkit.bounces",
    "mailkit.campaigns",
    "mailkit.contacts",
    "mailkit.dispatch",
    "mailkit.dkim",
    "mailkit.errors",
    "mailkit.messages",
    "mailkit.scheduling",
    "mailkit.segments",
    "mailkit.sink",
    "mailkit.templates",
    "mailkit.tracking",
    "mailkit.variants",
]


def test_all_names_exist() -> None:
    for name in mailkit.__all__:
        assert hasattr(mailkit, name), name


def test_all_is_unique() -> None:
    assert len(mailkit.__all__) == len(set(mailkit.__all__))


def test_every_module_export_is_reexported() -> None:
    missing = []
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        for name in getattr(module, "__all__", []):
            if name not in mailkit.__all__:
                missing.append(f"{module_name}.{name}")
    assert not missing, f"not re-exported from mailkit: {missing}"


def test_every_submodule_imports() -> None:
    for info in pkgutil.walk_packages(mailkit.__path__, "mailkit."):
        if ".migrations" in info.name:
            continue
        importlib.import_module(info.name)
