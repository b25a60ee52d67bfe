"""Backend discovery through the ``velesio.backends`` entry-point group.

Every backend, built-in or third-party, is a class registered by an installed distribution::

    [project.entry-points."velesio.backends"]
    example-echo = "velesio_example_echo:EchoBackend"

``discover()`` loads each one and checks that it fits this version of Velesio. A plugin that fails to
import, or is not a compatible ``velesio.backends.Backend`` subclass, becomes an entry with ``error`` set
(naming the plugin, the reason and the fix); discovery itself never raises because of a plugin, so the
worker can serve the rest and report the failure.

Only the class is imported: backend modules import their heavy libraries (torch, llama_cpp,
ctransformers...) lazily inside ``load()``, and report a missing one through ``unavailable_reason()``.

``VELESIO_BACKENDS`` (comma-separated backend names), when set, restricts which entry points are loaded;
the others are not imported at all.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from collections.abc import Iterable
from importlib import metadata
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from velesio.backends import Backend

ENTRY_POINT_GROUP = "velesio.backends"
ALLOW_ENV = "VELESIO_BACKENDS"

__all__ = ["ALLOW_ENV", "ENTRY_POINT_GROUP", "Discovered", "allow_list", "available", "describe", "discover"]


@dataclasses.dataclass
class Discovered:
    """One entry point of the ``velesio.backends`` group, loaded or not."""

    name: str  # the entry point's name: the ``backend:`` value in mesh.yaml
    value: str  # "package.module:Class"
    dist: str | None  # the distribution that registered it
    version: str | None  # that distribution's version
    backend: type[Backend] | None = None  # the Backend subclass, when it loaded and fits
    error: str | None = None  # why it cannot be used, and how to fix it

    @property
    def ok(self) -> bool:
        return self.backend is not None and self.error is None

    @property
    def reason(self) -> str | None:
        """``error`` without its fix (for a READY ``failures`` entry)."""
        return self.error.split("; fix: ", 1)[0] if self.error else None

    @property
    def fix(self) -> str | None:
        """The fix part of ``error``."""
        return self.error.split("; fix: ", 1)[1] if self.error and "; fix: " in self.error else None


def allow_list(value: str | None = None) -> set[str] | None:
    """The backend names ``VELESIO_BACKENDS`` allows, or None when it is unset or empty (all allowed)."""
    if value is None:
        value = os.environ.get(ALLOW_ENV)
    if not value:
        return None
    names = {part.strip() for part in value.split(",") if part.strip()}
    return names or None


def _entry_points() -> Iterable[metadata.EntryPoint]:
    return metadata.entry_points(group=ENTRY_POINT_GROUP)


def _dist_of(ep: metadata.EntryPoint) -> tuple[str | None, str | None]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return None, None
    try:
        return dist.metadata["Name"], dist.version
    except Exception:  # a broken METADATA file must not break discovery
        return getattr(dist, "name", None), None


def _where(d: Discovered) -> str:
    return f"backend plugin '{d.name}' ({d.value}" + (f", from {d.dist} {d.version})" if d.dist else ")")


def _fix_install(d: Discovered) -> str:
    skip = f"or leave it out with {ALLOW_ENV}"
    if d.dist == "velesio":
        return f"reinstall velesio (pip install -U 'velesio[all]'), {skip}"
    if d.dist:
        return f"reinstall or upgrade it (pip install -U {d.dist}), uninstall it (pip uninstall {d.dist}), {skip}"
    return f"reinstall or remove the distribution that registers it, {skip}"


def _check(d: Discovered, obj: object) -> str | None:
    """None when ``obj`` is a usable backend class for entry point ``d``, else the error message."""
    from velesio.backends import API_VERSION, Backend
    from velesio.mesh.protocol import IMAGE_OPERATIONS, TEXT_OPERATIONS

    where = _where(d)
    if not (inspect.isclass(obj) and issubclass(obj, Backend)):
        return (f"{where} does not name a velesio.backends.Backend subclass (got {obj!r}); "
                f"fix: point the entry point at a class that subclasses velesio.backends.Backend")
    api = getattr(obj, "api_version", None)
    if api != API_VERSION:
        if isinstance(api, int) and api > API_VERSION:
            fix = (f"upgrade velesio (pip install -U velesio), or install a release of {d.dist or d.name} "
                   f"for API {API_VERSION}")
        else:
            fix = f"upgrade the plugin (pip install -U {d.dist or d.name}) to one built for API {API_VERSION}"
        return f"{where} is built for backend API {api!r}, this velesio speaks API {API_VERSION}; fix: {fix}"
    if inspect.isabstract(obj):
        missing = ", ".join(sorted(getattr(obj, "__abstractmethods__", ())))
        return f"{where} does not implement {missing}; fix: implement them in {obj.__qualname__}"
    declared = getattr(obj, "name", None)
    if declared != d.name:
        return (f"{where} declares name {declared!r} but is registered as {d.name!r}; "
                f"fix: make the entry point name and {obj.__qualname__}.name the same")
    kind = getattr(obj, "kind", None)
    known = {"text": TEXT_OPERATIONS, "image": IMAGE_OPERATIONS}
    if kind not in known:
        return f"{where} declares kind {kind!r}; fix: set kind to 'text' or 'image'"
    ops = getattr(obj, "operations", None)
    if not isinstance(ops, (tuple, list)) or not ops:
        return f"{where} declares no operations; fix: set operations to a tuple of {known[kind]}"
    unknown = [op for op in ops if op not in known[kind]]
    if unknown:
        return (f"{where} declares unknown {kind} operations {unknown}; "
                f"fix: use only {', '.join(known[kind])}")
    return None


def discover(allow: set[str] | None | Literal["env"] = "env") -> list[Discovered]:
    """Load every backend registered in the ``velesio.backends`` entry-point group.

    ``allow``: backend names to load; the default reads ``VELESIO_BACKENDS`` (unset: all). Entry points
    outside it are skipped without being imported. A name in the allow-list that no installed
    distribution registers is reported as an error entry. Never raises because of a plugin.
    """
    names = allow_list() if allow == "env" else allow
    found: list[Discovered] = []
    seen: dict[str, Discovered] = {}
    for ep in _entry_points():
        if names is not None and ep.name not in names:
            continue
        dist, version = _dist_of(ep)
        d = Discovered(name=ep.name, value=ep.value, dist=dist, version=version)
        first = seen.get(ep.name)
        if first is not None:
            if first.value == d.value:
                continue  # the same distribution seen twice on sys.path
            d.error = (f"{_where(d)} uses a backend name already taken by {first.value}"
                       f"{' from ' + first.dist if first.dist else ''}; fix: uninstall one of them")
            found.append(d)
            continue
        seen[ep.name] = d
        found.append(d)
        try:
            obj = ep.load()
        except Exception as e:  # ImportError, SyntaxError, anything a module may raise at import
            d.error = f"{_where(d)} failed to import: {type(e).__name__}: {e}; fix: {_fix_install(d)}"
            continue
        d.error = _check(d, obj)
        if d.error is None:
            d.backend = obj
    if names is not None:
        for name in sorted(names - set(seen)):
            found.append(Discovered(
                name=name, value="", dist=None, version=None,
                error=(f"backend '{name}' is named in {ALLOW_ENV} but no installed distribution registers it; "
                       f"fix: install its plugin, or correct {ALLOW_ENV}")))
    return found


def available(discovered: list[Discovered] | None = None) -> dict[str, type[Backend]]:
    """``{name: Backend subclass}`` of the backends that loaded."""
    if discovered is None:
        discovered = discover()
    return {d.name: d.backend for d in discovered if d.backend is not None and d.error is None}


def _status(d: Discovered) -> str:
    if d.error or d.backend is None:
        return "error: " + (d.error or "the backend did not load")
    try:
        reason = d.backend.unavailable_reason()
    except Exception as e:
        return f"unavailable: {d.name}.unavailable_reason() raised {type(e).__name__}: {e}"
    return "ok" if reason is None else "unavailable: " + reason


def describe(discovered: list[Discovered] | None = None) -> list[str]:
    """Lines for ``velesio-worker --list-backends``: name, distribution and version, and whether it can load
    on this host, e.g. ``llama-cpp      velesio 0.1.0  ok``."""
    if discovered is None:
        discovered = discover()
    rows = [(d.name, f"{d.dist or '?'} {d.version or '?'}" if d.dist or d.value else "-", _status(d))
            for d in sorted(discovered, key=lambda d: d.name)]
    if not rows:
        return [f"no backends found in the '{ENTRY_POINT_GROUP}' entry-point group"
                + (f" (allowed by {ALLOW_ENV}: {os.environ[ALLOW_ENV]})" if allow_list() else "")]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    return [f"{name:<{w0}}  {dist:<{w1}}  {status}" for name, dist, status in rows]
