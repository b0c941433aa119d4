"""The one list of backbones: what each is, where its weights come from and how its files are named.

A new encoder is one ``BackboneSpec`` here (plus its tests): the per-backbone trainers, the weights listing, the
file-name patterns and the error messages all read it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from nnunet_dino.errors import DinoUNetError

RANDOM = "random"
TOKEN_GRID = 16  # every backbone yields one token per 16 px of the (padded) image; the adapter reads that grid


# Where each file naming's weights come from (named in every "weights not found" message)
WEIGHTS_ORIGIN = {
    "dinov3": "Meta's DINOv3 release (licence-gated: request access at "
              "https://ai.meta.com/resources/models-and-libraries/dinov3-downloads/)",
    "dinov2": "Meta's openly licensed DINOv2 release (the pretrained-backbone table of the facebookresearch/dinov2 "
              "repository; keep Meta's file name)",
    "meddinov3": "the MedDINOv3 authors' release (their repository's CT-3M ViT-B/16 checkpoint)",
    "test": "nowhere: the test backbone has random weights only",
}


@dataclass(frozen=True)
class BackboneSpec:
    """Everything about one backbone in one place: timm model, file naming and origin of its weights, shape, patch
    size, tapped blocks, default dtype of the frozen weights, and the suffix of its convenience trainer."""

    name: str
    timm_name: str
    arch: str  # token in Meta's file name, e.g. "vits16"
    embed_dim: int
    depth: int
    num_heads: int
    taps: tuple[int, ...]
    patch_size: int = 16
    family: str = "dinov3"  # "dinov3" (RoPE, timm Eva) or "dinov2" (absolute position embedding, timm ViT)
    source: str = ""        # whose file naming: "" = the family's (Meta's), or e.g. "meddinov3"
    swiglu: bool = False
    has_qkvb_variant: bool = True
    qkv_bias_keys: bool = True  # the file has attn.qkv.bias (+ mask) keys: Meta S..H+ yes, 7B and MedDINOv3 no
    random_only: bool = False  # the test backbone has no released weights
    timm_kwargs: dict = field(default_factory=dict)
    trainer_suffix: str = ""   # nnUNetTrainerDinoUNet_<suffix> pins this backbone ("" = no such trainer)
    default_dtype: str | None = None  # dtype of the frozen weights in that trainer (None: float32)

    @property
    def registers(self) -> bool:
        return self.family == "dinov2" and self.timm_name.endswith("reg4_dinov2")

    @property
    def summary(self) -> str:
        """One line for listings."""
        extras = "".join([", SwiGLU" if self.swiglu else "", ", 4 registers" if self.registers else ""])
        what = "TEST ONLY, random weights" if self.random_only else f"trainer {self.trainer}"
        shape = f"width {self.embed_dim}, {self.depth} blocks, patch {self.patch_size}"
        return f"{self.family} ViT, {shape}{extras}; {what}"

    @property
    def file_naming(self) -> str:
        """Whose file names and release this backbone's weights follow: "dinov3", "dinov2" or e.g. "meddinov3"."""
        return self.source or self.family

    @property
    def weights_origin(self) -> str:
        return WEIGHTS_ORIGIN["test" if self.random_only else self.file_naming]

    @property
    def model_kwargs(self) -> dict:
        """timm's create_model keyword arguments for this backbone (no classifier head)."""
        return {"num_classes": 0, **self.timm_kwargs}

    @property
    def trainer(self) -> str | None:
        """The convenience trainer that pins this backbone (nnUNetTrainerDinoUNet follows any plans' backbone)."""
        return f"nnUNetTrainerDinoUNet_{self.trainer_suffix}" if self.trainer_suffix else None


_SPECS = (
    BackboneSpec("dinov3_vits16", "vit_small_patch16_dinov3", "vits16", 384, 12, 6, (2, 5, 8, 11), trainer_suffix="S"),
    BackboneSpec("dinov3_vits16plus", "vit_small_plus_patch16_dinov3", "vits16plus", 384, 12, 6, (2, 5, 8, 11),
                 swiglu=True, trainer_suffix="SPlus"),
    BackboneSpec("dinov3_vitb16", "vit_base_patch16_dinov3", "vitb16", 768, 12, 12, (2, 5, 8, 11), trainer_suffix="B"),
    BackboneSpec("dinov3_vitl16", "vit_large_patch16_dinov3", "vitl16", 1024, 24, 16, (4, 11, 17, 23),
                 trainer_suffix="L"),
    BackboneSpec("dinov3_vith16plus", "vit_huge_plus_patch16_dinov3", "vith16plus", 1280, 32, 20, (7, 15, 23, 31),
                 swiglu=True, trainer_suffix="HPlus"),
    BackboneSpec("dinov3_vit7b16", "vit_7b_patch16_dinov3", "vit7b16", 4096, 40, 32, (9, 19, 29, 39), swiglu=True,
                 has_qkvb_variant=False, qkv_bias_keys=False, trainer_suffix="7B", default_dtype="bfloat16"),
    # MedDINOv3 (CT-3M): DINOv3 ViT-B/16 continued on CT slices; Meta's keys without q/k/v bias
    BackboneSpec("meddinov3_vitb16_ct3m", "vit_base_patch16_dinov3", "vitb16_ct3m", 768, 12, 12, (2, 5, 8, 11),
                 source="meddinov3", qkv_bias_keys=False, trainer_suffix="MedDINOv3B"),
    # TEST ONLY: same block type as ViT-S, 4 blocks of width 64, random weights. Fast CPU tests and smoke runs;
    # results with it say nothing about accuracy.
    BackboneSpec("dinov3_test_tiny", "vit_small_patch16_dinov3", "test_tiny", 64, 4, 2, (0, 1, 2, 3),
                 random_only=True, timm_kwargs={"embed_dim": 64, "depth": 4, "num_heads": 2}),
    # DINOv2 (patch 14; fed the image at 14/16 of its size so tokens land on the same 1/16 grid)
    *(BackboneSpec(f"dinov2_vit{size}14{reg}", f"vit_{timm_size}_patch14{'_reg4' if reg else ''}_dinov2",
                   f"vit{size}14{'_reg4' if reg else ''}", dim, depth, heads, taps, patch_size=14, family="dinov2",
                   swiglu=size == "g", has_qkvb_variant=False, timm_kwargs={"img_size": 518},
                   trainer_suffix=f"DINOv2{size.upper()}{reg}")
      for size, timm_size, dim, depth, heads, taps in (
          ("s", "small", 384, 12, 6, (2, 5, 8, 11)), ("b", "base", 768, 12, 12, (2, 5, 8, 11)),
          ("l", "large", 1024, 24, 16, (4, 11, 17, 23)), ("g", "giant", 1536, 40, 24, (9, 19, 29, 39)))
      for reg in ("", "_reg")),
)
BACKBONES: dict[str, BackboneSpec] = {s.name: s for s in _SPECS}


def spec_matches(spec: BackboneSpec, facts: dict, depth: int | None = None) -> bool:
    """Whether a state dict's shape facts (weights.describe_state_dict) are those of this registry entry."""
    same = (spec.family, spec.patch_size, spec.embed_dim, depth or spec.depth, spec.swiglu, spec.registers) == (
        facts["family"], facts["patch"], facts["embed_dim"], facts["depth"], facts["swiglu"], facts["registers"])
    # Meta-keyed DINOv3 files tell MedDINOv3 (no q/k/v bias keys) from Meta's ViT-B (zero bias + mask keys)
    if facts["meta_layout"] and spec.family == "dinov3":
        same = same and facts["bias_keys"] == spec.qkv_bias_keys
    return same


def looks_like(facts: dict, specs) -> str:
    """Name the registry entry whose shape facts match (or describe the shape when none does)."""
    for spec in specs:
        if not spec.random_only and spec_matches(spec, facts):
            return spec.name
    mlp = "SwiGLU" if facts["swiglu"] else "MLP"
    return (f"an unknown {facts['family'].upper()} ViT (patch {facts['patch']}, width {facts['embed_dim']}, "
            f"{facts['depth']} blocks, {mlp})")


def trainer_for(name: str) -> str:
    """The trainer to name in a message about a backbone: its convenience trainer, else the one that follows the
    plans."""
    return (BACKBONES[name].trainer if name in BACKBONES else None) or "nnUNetTrainerDinoUNet"


def get_spec(name: str) -> BackboneSpec:
    """Registry lookup with an error that lists the valid names."""
    if name not in BACKBONES:
        raise DinoUNetError(f"Unknown backbone '{name}'; valid choices: {', '.join(BACKBONES)}.")
    return BACKBONES[name]
