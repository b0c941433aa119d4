"""Which import paths a plans file may name, checked before nnU-Net imports them.

nnU-Net plans name the network class and its ops by import path, and nnU-Net resolves whatever is written there with
``pydoc.locate``, so a handed plans file could make training or prediction run any callable (``"nonlin":
"subprocess.call"``, or a path that walks through a module's imports: ``...unet.torch.hub.load``). A prefix check is
not enough. Each name is resolved the way ``pydoc.locate`` resolves it, importing only modules inside the allowed
packages, and must be exactly ``<module>.<Class>``: a ``torch.nn.Module`` subclass (not ``Module`` itself) defined in
those packages -- nnU-Net's and ours for the network, ``torch.nn`` (or ours) for ops.
"""
from __future__ import annotations

import importlib
import re

from nnunet_dino.errors import DinoUNetError
from nnunet_dino.network.ops import DEFAULT_OPS, OP_KEYS

NETWORK_PACKAGES = ("dynamic_network_architectures", "nnunet_dino")
OP_PACKAGES = ("torch.nn", "nnunet_dino")
_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$")


def _in_package(name: str, packages: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def resolve_module_class(name: str, packages: tuple[str, ...]) -> type | None:
    """The ``torch.nn.Module`` subclass that ``name`` names as ``<module>.<Class>``, where the module and the class's
    own module are inside ``packages``; None for anything else (a function, ``Module`` itself, a class re-exported
    from elsewhere, a path through another module's attributes, a malformed name). Imports only inside ``packages``."""
    import torch.nn

    if not isinstance(name, str) or not _DOTTED.match(name) or not _in_package(name, packages):
        return None
    module_name, _, attr = name.rpartition(".")
    if not _in_package(module_name, packages):
        return None
    try:
        module = importlib.import_module(module_name)
    except ImportError:  # the prefix is not a module: a path through attributes (e.g. ``unet.torch.hub``)
        return None
    obj = getattr(module, attr, None)
    if not (isinstance(obj, type) and issubclass(obj, torch.nn.Module) and obj is not torch.nn.Module):
        return None
    return obj if _in_package(getattr(obj, "__module__", "") or "", packages) else None


def check_op_name(key: str, value: object) -> None:
    """Refuse an op import path that is not a ``torch.nn`` (or our own) ``nn.Module`` class, before importing it."""
    if value is None:
        return
    if resolve_module_class(str(value), OP_PACKAGES) is None:
        raise DinoUNetError(
            f"plans.json names '{value}' as {key} of the Dino U-Net architecture; only torch.nn module classes are "
            f"allowed there (e.g. {DEFAULT_OPS.get(key) or 'torch.nn.Dropout2d'}); fix that entry of the plans."
        )


def check_plans_imports(plans: dict, where: object = "plans.json") -> None:
    """Every import path in every configuration's architecture block (ours or stock nnU-Net's) checked before
    anything outside the allowed packages is imported: the network class must be a module class of
    dynamic_network_architectures (nnU-Net's) or this package, and each name nnU-Net would import must be a torch.nn
    module class (nnU-Net itself imports whatever is written)."""
    for name, cfg in (plans.get("configurations") or {}).items():
        arch = cfg.get("architecture") if isinstance(cfg, dict) else None
        if not isinstance(arch, dict):
            continue
        network = arch.get("network_class_name", "")
        if resolve_module_class(str(network), NETWORK_PACKAGES) is None:
            raise DinoUNetError(
                f"{where} names '{network}' as the network of configuration {name}; only network classes of "
                f"dynamic_network_architectures (nnU-Net's) or nnunet_dino are allowed -- fix or remove that plans "
                f"file."
            )
        kwargs = arch.get("arch_kwargs") or {}
        required = arch.get("_kw_requires_import") or ()
        if not isinstance(required, (list, tuple)) or not isinstance(kwargs, dict):
            raise DinoUNetError(f"{where}: configuration {name}'s architecture is malformed (arch_kwargs must be an "
                                f"object, _kw_requires_import a list) -- fix or remove that plans file.")
        for key in {str(k) for k in required} | (set(OP_KEYS) & set(kwargs)):
            value = kwargs.get(key)
            try:
                check_op_name(key, value)
            except DinoUNetError:
                raise DinoUNetError(
                    f"{where} names '{value}' as {key} of configuration {name}; only torch.nn module classes are "
                    f"allowed there (e.g. {DEFAULT_OPS.get(key) or 'torch.nn.Dropout2d'}) -- fix that entry."
                ) from None
