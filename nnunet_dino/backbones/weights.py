"""Finding, verifying and reading Meta's DINOv3 weight files. Never downloads anything.

Meta's files are named ``dinov3_<arch>_pretrain_<lvd1689m|sat493m>-<8 hex>.pth``, the hex being the first 8
characters of the file's SHA-256. We look for them in the folder named by ``nnUNet_dino_weights``, check the hash
once per file (``nnunet_dino.backbones.hash_cache``: a 27 GB file is not re-hashed every run, a swapped file is
still caught)
and load them memory-mapped so a large backbone never needs twice its size in RAM.
"""
from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from nnunet_dino.backbones.hash_cache import cached_sha256, file_sha256
from nnunet_dino.backbones.registry import WEIGHTS_ORIGIN
from nnunet_dino.errors import DinoUNetError

logger = logging.getLogger(__name__)

WEIGHTS_ENV = "nnUNet_dino_weights"
PRETRAIN_DATASETS = ("lvd1689m", "sat493m")
_HASH_IN_NAME = re.compile(r"-([0-9a-fA-F]{8})\.(pth|safetensors)$")


def origin_of(path: str | os.PathLike) -> str:
    """Where a weight file of this name comes from, for messages (DINOv2 and MedDINOv3 files are not Meta's DINOv3)."""
    name = Path(path).name.lower()
    naming = next((k for k in ("dinov2", "meddinov3") if name.startswith(k) or f"/{k}" in str(path).lower()),
                  "dinov3")
    return WEIGHTS_ORIGIN[naming]


def weights_folder() -> Path | None:
    """The folder named by ``nnUNet_dino_weights``, or None when the variable is unset or empty."""
    value = os.environ.get(WEIGHTS_ENV, "").strip()
    if not value:
        return None
    folder = Path(value).expanduser()
    if folder.is_file():
        raise DinoUNetError(f"{WEIGHTS_ENV} must name the folder that holds the weight files, but {folder} is a file; "
                            f"export {WEIGHTS_ENV}={folder.parent}.")
    return folder


def meta_file_name(arch: str, dataset: str = "lvd1689m", sha256: str | None = None, suffix: str = ".pth",
                   family: str = "dinov3") -> str:
    """Meta's file name for an architecture token such as ``vits16``: the one place that spells the pattern.

    DINOv3: ``dinov3_<arch>_pretrain_<dataset>-<8 hex>.pth``; DINOv2: ``dinov2_<arch>_pretrain.pth`` (no hash)."""
    tag = f"-{sha256[:8]}" if sha256 else ""
    if family == "dinov2":
        return f"dinov2_{arch}_pretrain{tag}{suffix}"
    if family == "meddinov3":  # MedDINOv3 publishes no canonical name; we ask for this one
        return f"meddinov3_{arch}{tag}{suffix}"
    return f"dinov3_{arch}_pretrain_{dataset}{tag}{suffix}"


def expected_file_name(arch: str, dataset: str = "lvd1689m", family: str = "dinov3") -> str:
    """Meta's file name, for messages (the DINOv3 hash part shown as a wildcard)."""
    return meta_file_name(arch, dataset, sha256="<8 hex>" if family == "dinov3" else None, family=family)


def _meta_name_pattern(arch: str, dataset: str, family: str) -> re.Pattern:
    stem = re.escape(meta_file_name(arch, dataset, suffix="", family=family))
    return re.compile(rf"^{stem}(-[0-9a-fA-F]{{8}})?\.(pth|safetensors)$")


def find_weight_files(arch: str, folder: Path, family: str = "dinov3") -> list[Path]:
    """All files in ``folder`` that are Meta's weights for ``arch`` (DINOv3: LVD-1689M first, then SAT-493M).

    Accepts Meta's ``.pth`` names, the same names with ``.safetensors``, and Hugging Face style sub-folders
    (``dinov3-<arch>-pretrain-<dataset>/model.safetensors``).
    """
    if not folder.is_dir():
        return []
    found: list[Path] = []
    for dataset in PRETRAIN_DATASETS if family == "dinov3" else ("",):  # only DINOv3 names carry a dataset
        pattern = _meta_name_pattern(arch, dataset, family)
        found += sorted(p for p in folder.iterdir() if p.is_file() and pattern.match(p.name))
        hf = folder / f"dinov3-{arch}-pretrain-{dataset}" / "model.safetensors"
        if family == "dinov3" and hf.is_file():
            found.append(hf)
    return found


def check_readable(path: str | os.PathLike) -> Path:
    """One-line errors for a weight file that is missing, empty or unreadable (before any hashing or parsing)."""
    path = Path(path)
    if not path.is_file():
        raise DinoUNetError(f"Backbone weight file {path} does not exist; check the path or {WEIGHTS_ENV}.")
    if path.stat().st_size == 0:
        raise DinoUNetError(f"{path} is empty (0 bytes): the download did not complete; download it again from "
                            f"{origin_of(path)}.")
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        raise DinoUNetError(f"{path} cannot be read ({e.strerror}); fix its permissions (e.g. chmod a+r {path}) or "
                            f"copy it somewhere readable.") from None
    return path


def verify_file(path: str | os.PathLike) -> str:
    """Return the file's SHA-256; if its name carries Meta's 8-hex hash, refuse a file that does not match."""
    path = check_readable(path)
    sha = file_sha256(path)
    m = _HASH_IN_NAME.search(path.name)
    if m and not sha.startswith(m.group(1).lower()):
        raise DinoUNetError(
            f"Hash mismatch for {path}: its name says SHA-256 {m.group(1)}… but the file's SHA-256 is "
            f"{sha[:8]}… (full {sha}); the file is corrupt, truncated or renamed — download it again from "
            f"{origin_of(path)}."
        )
    return sha


def weights_differ_error(backbone: str, found_file: object, found_sha256: str, trained_sha256: str,
                         trained_file: object = None) -> DinoUNetError:
    """The one message for "these are not the weights this model was trained with"."""
    trained = f" ({trained_file})" if trained_file and str(trained_file) != str(found_file) else ""
    return DinoUNetError(
        f"The {backbone} weights found, {found_file} (SHA-256 {str(found_sha256)[:12]}…), differ from those this model "
        f"was trained with{trained} (SHA-256 {str(trained_sha256)[:12]}…); put the original file into the folder "
        f"named by {WEIGHTS_ENV}."
    )


def cached_verification(path: str | os.PathLike) -> str | None:
    """The cached SHA-256 of ``path`` if it is still valid, without hashing (for listings)."""
    return cached_sha256(path)


# --------------------------------------------------------------------------------------------------------------
# Reading state dicts
# --------------------------------------------------------------------------------------------------------------
def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a DINOv3 checkpoint memory-mapped (Meta ``.pth``, timm/Meta-keyed ``.safetensors``).

    Unwraps training-checkpoint containers (``model``/``state_dict``/``teacher`` with a ``backbone.`` prefix).
    """
    path = check_readable(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path), device="cpu")
        else:
            sd = _load_pth_mapped(path)
    except DinoUNetError:
        raise
    except Exception as e:  # noqa: BLE001 - any reader failure means the same thing to the user
        raise DinoUNetError(
            f"{path} is not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
            f"the file is truncated or not a DINO weight file — download it again from {origin_of(path)}."
        ) from None
    return _unwrap(sd, path)


def _load_pth_mapped(path: Path) -> dict:
    """torch.load memory-mapped: no copy of the weights in RAM.

    ``torch.load(mmap=True)`` maps the file copy-on-write, which the kernel refuses for a file larger than what it
    will commit (Meta's 7B file is 26.9 GB, more than many hosts' RAM). Then the file is mapped read-only and shared,
    which costs only page cache; those frozen tensors must never be written in place (the backbone never is).
    """
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except RuntimeError as e:
        if "unable to mmap" in str(e):
            return _load_pth_read_only(path)
        if "mmap" not in str(e):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)  # legacy non-zip files cannot be mapped


def _load_pth_read_only(path: Path) -> dict:
    import warnings

    import numpy as np
    import torch.serialization as ts

    mapped = np.memmap(path, dtype=np.uint8, mode="r")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # read-only buffer, by design
        overall = torch.from_numpy(mapped).untyped_storage()
    logger.info("%s is larger than the memory the kernel commits: mapped read-only", path.name)
    with open(path, "rb") as f, ts._open_zipfile_reader(f) as zf:
        return ts._load(zf, "cpu", ts._weights_only_unpickler, overall_storage=overall, weights_only=True)


def _unwrap(sd: object, path: Path) -> dict[str, torch.Tensor]:
    for key in ("teacher", "model", "state_dict"):
        if isinstance(sd, Mapping) and key in sd and isinstance(sd[key], Mapping):
            sd = sd[key]
    if not isinstance(sd, Mapping) or not sd:
        raise DinoUNetError(f"{path} holds no state dict; expected a DINO weight file (Meta's DINOv3/DINOv2 .pth "
                            f"or a Hugging Face model.safetensors from {origin_of(path)}).")
    if any(k.startswith("backbone.") for k in sd):
        sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    if "embeddings.patch_embeddings.weight" in sd:
        sd = hf_transformers_to_meta(sd)
    elif "embeddings.patch_embeddings.projection.weight" in sd:
        from nnunet_dino.backbones.dinov2 import hf_dinov2_to_meta

        sd = hf_dinov2_to_meta(sd)
    if "patch_embed.proj.weight" not in sd or not any(k.startswith("blocks.") for k in sd):
        raise DinoUNetError(
            f"{path} is not a DINO ViT checkpoint (no patch_embed/blocks keys); use Meta's "
            f"{expected_file_name('<arch>', '<dataset>')} file from {origin_of(path)}."
        )
    return dict(sd)


_HF_RENAMES = (
    ("embeddings.cls_token", "cls_token"), ("embeddings.mask_token", "mask_token"),
    ("embeddings.register_tokens", "storage_tokens"), ("embeddings.patch_embeddings.", "patch_embed.proj."),
    (".attention.o_proj.", ".attn.proj."), (".layer_scale1.lambda1", ".ls1.gamma"),
    (".layer_scale2.lambda1", ".ls2.gamma"), (".mlp.gate_proj.", ".mlp.w1."),
)


def hf_transformers_to_meta(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face ``DINOv3ViTModel`` keys -> Meta's (q/k/v merged into qkv, layer_scale -> ls, gated MLP names).

    Written from the transformers naming (layer.N.attention.{q,k,v,o}_proj, layer_scaleK.lambda1, mlp.{gate,up,
    down}_proj); the RoPE periods are not stored there and are recomputed.
    """
    gated = any(".mlp.gate_proj." in k for k in sd)
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if ".attention.k_proj." in k or ".attention.v_proj." in k:
            continue
        k = k.replace("layer.", "blocks.", 1) if k.startswith("layer.") else k
        if ".attention.q_proj." in k:
            base = k.split(".attention.q_proj.")[0]
            src = base.replace("blocks.", "layer.", 1) + ".attention."
            if k.endswith("weight"):
                out[f"{base}.attn.qkv.weight"] = torch.cat([sd[src + f"{p}_proj.weight"] for p in "qkv"])
            else:
                q, v_ = sd[src + "q_proj.bias"], sd[src + "v_proj.bias"]
                out[f"{base}.attn.qkv.bias"] = torch.cat([q, torch.zeros_like(q), v_])
            continue
        for old, new in _HF_RENAMES:
            k = k.replace(old, new)
        if gated:
            k = k.replace(".mlp.up_proj.", ".mlp.w2.").replace(".mlp.down_proj.", ".mlp.w3.")
        else:
            k = k.replace(".mlp.up_proj.", ".mlp.fc1.").replace(".mlp.down_proj.", ".mlp.fc2.")
        out[k] = v.reshape(1, -1) if k == "mask_token" else v
    return out


def describe_state_dict(sd: Mapping[str, torch.Tensor]) -> dict:
    """Shape facts that identify a ViT variant: family, patch, width, depth, MLP kind, registers, q/v bias in use."""
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    swiglu = any(".mlp.w1." in k or ".mlp.fc1_g." in k or ".mlp.w12." in k for k in sd)
    qkv_bias = False
    for k, v in sd.items():
        if k.endswith("attn.qkv.bias"):
            mask = sd.get(k + "_mask")
            eff = v * mask if mask is not None else v
            qkv_bias = qkv_bias or bool(eff.abs().sum() > 0)
        elif k.endswith("attn.q_bias") or k.endswith("attn.v_bias"):
            qkv_bias = qkv_bias or bool(v.abs().sum() > 0)
    family = "dinov2" if "pos_embed" in sd else "dinov3"
    return {
        "family": family,
        "patch": int(sd["patch_embed.proj.weight"].shape[-1]),
        "embed_dim": int(sd["patch_embed.proj.weight"].shape[0]),
        "depth": depth,
        "swiglu": swiglu,
        "registers": family == "dinov2" and ("register_tokens" in sd or "reg_token" in sd),
        "bias_keys": any(k.endswith(("attn.qkv.bias", "attn.q_bias")) for k in sd),
        "qkv_bias": qkv_bias,
        "meta_layout": "storage_tokens" in sd,
    }
