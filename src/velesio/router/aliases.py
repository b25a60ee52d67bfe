"""``router.model_aliases``: the model names clients send (``gpt-3.5-turbo``, ``text-embedding-3-small``,
``davinci-002`` ...) mapped to models the mesh serves, before a job is admitted (router/admission.py).

- an alias applies to the name it lists, whether or not a worker offers a model of that name;
- ``"*"`` applies to a name that no worker offers and the router has never seen offered (a model whose
  worker is restarting keeps its name), and only when its target serves the operation asked for (an image
  request naming an unknown checkpoint is not sent to a text model);
- aliases do not chain; a name that no alias covers and no worker offers is 404 ``model_not_found``.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

ANY = "*"


def resolve(aliases: Mapping[str, str], name: str | None, op: str, live: Mapping[str, dict[str, Any]],
            known: Collection[str]) -> str | None:
    """The model ``name`` stands for: its alias, the ``"*"`` alias for an unknown name, or ``name``.
    ``live`` is what live workers offer (model name -> info with ``operations``), ``known`` every model name
    the router has seen offered."""
    if not name or not aliases:
        return name
    target = aliases.get(name)
    if target:
        return target
    fallback = aliases.get(ANY)
    if not fallback or name in live or name in known:
        return name
    info = live.get(fallback)
    if info is not None and op not in (info.get("operations") or ()):
        return name  # the catch-all does not serve this operation: the name stays unknown
    return fallback
