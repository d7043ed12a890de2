"""Plug-ins: packages that add model references, image sets, prompt sets, feature spaces or measures.

A plug-in is a function registered as an entry point in the `dmm_cli.plugins` group; it calls the
`register_*` functions of the registries it extends. Registries load every plug-in the first time
they are asked for something, so merely importing dmm's core imports no plug-in. The toy zoo is
one such plug-in (see pyproject.toml).
"""
from __future__ import annotations

from importlib.metadata import entry_points

GROUP = "dmm_cli.plugins"
_loaded = False


def load() -> None:
    """Call every installed plug-in's register function, once per process."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for entry in entry_points(group=GROUP):
        entry.load()()
