"""Sphinx configuration for the shufflesgd API reference (``make docs``).

The pages are built from the docstrings by autodoc; napoleon reads their Google-style
sections ("Args:", "Returns:", "Attributes:") and MathJax renders ``:math:``.  ``make test``
builds with ``-E -n -W``: every warning, an unresolved cross-reference included, fails the
build, and so does a public module that no page documents.  No inventory is fetched from the
network, so third-party and standard-library types are listed in ``nitpick_ignore_regex``
instead of being linked.  A name that a family package re-exports resolves to the module that
defines it, which is where each name is documented (once).
"""

from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
import sys
import typing
from typing import Any

from docutils import nodes
from sphinx.application import Sphinx
from sphinx.environment import BuildEnvironment
from sphinx.util import logging

sys.path.insert(0, os.path.abspath(".."))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
logger = logging.getLogger(__name__)

project = "shufflesgd"
author = "shufflesgd contributors"
copyright = "shufflesgd contributors"
release = version = "0.1.0"

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
]

html_theme = "furo"
html_title = "shufflesgd"
add_module_names = False
exclude_patterns = ["_build"]
nitpicky = True

autodoc_default_options = {"member-order": "bysource"}
autodoc_typehints = "signature"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
autodoc_inherit_docstrings = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = False
napoleon_use_rtype = False
# The "Attributes:" sections say what a field is; the class signature already gives its type.
napoleon_attr_annotations = False

# Types of the libraries underneath, which have no local inventory to link to.
_THIRD_PARTY = (
    r"(jax|jaxlib|numpy|np|optax|flax|nnx|orbax|ocp|chex|diffrax|tensorflow_datasets"
    r"|tfds|grain|ml_collections|sklearn|blackjax|arviz|scipy)"
)
# The standard library's inventory is not fetched either.
_STDLIB = r"(collections\.abc|os|pathlib|typing|types|enum|dataclasses)"
nitpick_ignore_regex = [
    (r"py:.*", _THIRD_PARTY + r"(\..*)?"),
    (r"py:.*", _STDLIB + r"\..*"),
]


def _skip_fields(
    app: Sphinx, what: str, name: str, obj: Any, skip: bool, options: Any
) -> bool | None:
    """Leave out the data fields of classes (a NamedTuple's ``Alias for field number i``, a
    dataclass's or Flax module's annotated attributes): the class's signature and the
    "Attributes:" section of its docstring describe them, once."""
    if what != "class" or name.startswith("__"):
        return None
    if inspect.isroutine(obj) or inspect.isclass(obj) or isinstance(obj, property):
        return None
    return True


def _defining_path(path: str) -> str | None:
    """The ``module.qualname`` where the object that ``path`` names is defined, if importable
    (an attribute of a class, such as a NamedTuple field, keeps its name after its class's)."""
    parts = path.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        defined = obj.__name__
        for attr in parts[cut:]:
            obj = getattr(obj, attr, None)
            if obj is None:
                return None
            module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
            if inspect.ismodule(obj):
                defined = obj.__name__
            elif isinstance(module, str) and isinstance(qualname, str):
                defined = f"{module}.{qualname}"
            else:
                defined = f"{defined}.{attr}"
        return defined
    return None


def _alias_as_text(
    app: Sphinx, env: BuildEnvironment, node: nodes.Element, contnode: nodes.Element
) -> nodes.Element | None:
    """Show as plain text a name that a module's annotations use but that has no page here: a
    type alias (``PyTree = Any``, ``Shape = tuple[int, ...]``, which the signatures of
    NamedTuples keep by name) or a type imported from a third-party library (``Array``)."""
    module = node.get("py:module") or ""
    if node.get("refdomain") != "py" or node["reftype"] not in ("class", "obj"):
        return None
    if not module.startswith("shufflesgd"):
        return None
    try:
        value = getattr(importlib.import_module(module), node["reftarget"])
    except (ImportError, AttributeError):
        return None
    is_alias = value is typing.Any or typing.get_origin(value) is not None
    is_foreign = inspect.isclass(value) and not value.__module__.startswith("shufflesgd")
    return contnode if is_alias or is_foreign else None


def _documented_data(env: BuildEnvironment, path: str) -> str | None:
    """The documented name of the module-level constant that ``path`` reaches through a
    re-export (``shufflesgd.compression.FLOAT_BITS``): data carry no ``__module__``, so look
    for the one documented object of that name in the family that is the same object."""
    package, _, name = path.rpartition(".")
    try:
        value = getattr(importlib.import_module(package), name)
    except (ImportError, AttributeError):
        return None
    for fullname in env.get_domain("py").objects:
        owner, _, last = fullname.rpartition(".")
        if last == name and owner.startswith(package) and owner != package:
            try:
                if getattr(importlib.import_module(owner), name) is value:
                    return fullname
            except (ImportError, AttributeError):
                continue
    return None


def _resolve_reexport(
    app: Sphinx, env: BuildEnvironment, node: nodes.Element, contnode: nodes.Element
) -> nodes.Element | None:
    """Resolve a name that a family package re-exports (``shufflesgd.shuffling.make_scheme``,
    or ``make_scheme`` from a sibling module of the family) to where it is defined."""
    if node.get("refdomain") != "py":
        return None
    target = node["reftarget"]
    module = node.get("py:module") or ""
    candidates = [target] if "." in target else []
    parts = module.split(".")
    candidates += [".".join(parts[:cut] + [target]) for cut in range(len(parts), 0, -1)]
    domain = env.get_domain("py")
    for candidate in candidates:
        if not candidate.startswith("shufflesgd."):
            continue
        for defined in (_defining_path(candidate), _documented_data(env, candidate)):
            if defined is None or defined == target:
                continue
            found = domain.resolve_xref(
                env, node["refdoc"], app.builder, node["reftype"], defined, node, contnode
            )
            if found is not None:
                return found
    return None


def _check_every_module_documented(app: Sphinx, env: BuildEnvironment) -> None:
    """Warn (an error in the strict build) about a public module of the library that no page
    documents, so a new file cannot be left out of the reference."""
    import shufflesgd

    documented = set(env.get_domain("py").modules)
    for info in pkgutil.walk_packages(shufflesgd.__path__, "shufflesgd."):
        private = any(part.startswith("_") for part in info.name.split("."))
        if not private and info.name not in documented:
            logger.warning(
                "module %s is on no page of the reference: add an automodule section to "
                "its family's page",
                info.name,
                type="shufflesgd",
                subtype="coverage",
            )


def setup(app: Sphinx) -> None:
    app.connect("autodoc-skip-member", _skip_fields)
    app.connect("missing-reference", _resolve_reexport)
    app.connect("missing-reference", _alias_as_text)
    app.connect("env-check-consistency", _check_every_module_documented)
