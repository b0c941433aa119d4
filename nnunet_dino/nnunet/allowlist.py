"""Which import paths a plans file may name, checked before anything imports them.

nnU-Net plans name the network class and its ops by import path, and nnU-Net imports whatever is written there, so a
handed plans file could make training or prediction run any callable (``"nonlin": "subprocess.call"``). We accept
only nnU-Net's own network classes (dynamic_network_architectures) and ours, and ``torch.nn`` module classes as ops.
"""
from __future__ import annotations

import pydoc

from nnunet_dino.errors import DinoUNetError
from nnunet_dino.network.ops import DEFAULT_OPS, OP_KEYS

_ALLOWED_PREFIXES = ("torch.nn.", "nnunet_dino.")


def check_op_name(key: str, value: object) -> None:
    """Refuse an op import path that is not a ``torch.nn`` (or our own) ``nn.Module`` class, before importing it."""
    if value is None:
        return
    name = str(value)
    if not name.startswith(_ALLOWED_PREFIXES):
        raise DinoUNetError(
            f"plans.json names '{name}' as {key} of the Dino U-Net architecture; only torch.nn classes are allowed "
            f"there (e.g. {DEFAULT_OPS.get(key) or 'torch.nn.Dropout2d'}); fix that entry of the plans."
        )
    import torch.nn

    obj = pydoc.locate(name)
    if not (isinstance(obj, type) and issubclass(obj, torch.nn.Module)):
        raise DinoUNetError(
            f"plans.json names '{name}' as {key} of the Dino U-Net architecture, which is not a torch.nn module "
            f"class; use e.g. {DEFAULT_OPS.get(key) or 'torch.nn.Dropout2d'}."
        )


_ALLOWED_NETWORK_PREFIXES = ("dynamic_network_architectures.", "nnunet_dino.")


def check_plans_imports(plans: dict, where: object = "plans.json") -> None:
    """Every import path in every configuration's architecture block (ours or stock nnU-Net's) checked before
    anything is imported: the network class must come from dynamic_network_architectures or this package, and
    each op nnU-Net would import must be a torch.nn module class (nnU-Net itself imports whatever is written)."""
    for name, cfg in (plans.get("configurations") or {}).items():
        arch = cfg.get("architecture") if isinstance(cfg, dict) else None
        if not isinstance(arch, dict):
            continue
        network = str(arch.get("network_class_name", ""))
        if not network.startswith(_ALLOWED_NETWORK_PREFIXES):
            raise DinoUNetError(
                f"{where} names '{network}' as the network of configuration {name}; only classes of "
                f"dynamic_network_architectures (nnU-Net's) or nnunet_dino are allowed -- fix or remove that plans "
                f"file."
            )
        kwargs = arch.get("arch_kwargs") or {}
        for key in set(arch.get("_kw_requires_import") or ()) | (set(OP_KEYS) & set(kwargs)):
            value = kwargs.get(key)
            try:
                check_op_name(key, value)
            except DinoUNetError:
                raise DinoUNetError(
                    f"{where} names '{value}' as {key} of configuration {name}; only torch.nn module classes are "
                    f"allowed there (e.g. {DEFAULT_OPS.get(key) or 'torch.nn.Dropout2d'}) -- fix that entry."
                ) from None
