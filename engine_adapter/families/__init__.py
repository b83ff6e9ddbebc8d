"""The model families the servicer serves: one module each, registered by being here.

A module defines FAMILY (a base.Family); the registry is every such module in this package, so adding a
family is adding its module (README, "Layout", says what else). Plain data: no vLLM import.
"""

import importlib
import pkgutil
from collections.abc import Sequence

from engine_adapter.families.base import Family, Fields, TinyRecipe, Token, Tokens

__all__ = ["FAMILIES", "Family", "Fields", "TinyRecipe", "Token", "Tokens", "by_model_type", "family_for"]


def _discover() -> tuple[Family, ...]:
    modules = (importlib.import_module(f"{__name__}.{m.name}") for m in pkgutil.iter_modules(__path__))
    return tuple(sorted((m.FAMILY for m in modules if hasattr(m, "FAMILY")), key=lambda f: f.name))


FAMILIES: tuple[Family, ...] = _discover()


def family_for(architectures: Sequence[str], model_type: str) -> Family | None:
    """The family serving this checkpoint: by architecture (as vLLM picks its model), else by model_type."""
    for family in FAMILIES:
        if set(architectures) & set(family.architectures):
            return family
    return next((f for f in FAMILIES if model_type in f.model_types), None)


def by_model_type(model_type: str) -> Family:
    """The registered family whose tiny checkpoint has this model_type (tests, tinyvlm)."""
    return next(f for f in FAMILIES if f.model_types[0] == model_type)
