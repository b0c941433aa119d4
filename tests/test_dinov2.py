"""DINOv2 backbones: Meta-format and Hugging Face files, the 1/16 token grid, parity with an independent oracle
(Hugging Face transformers' Dinov2Model) and Meta's position-embedding interpolation."""
import math

import pytest
import torch
import torch.nn.functional as F

from nnunet_dino.backbones import BACKBONES, build_backbone
from nnunet_dino.backbones.dinov2 import hf_dinov2_to_meta, interpolate_pos_embed, resize_to_patch_grid
from nnunet_dino.errors import DinoUNetError
from nnunet_dino.testing.synthetic import write_meta_checkpoint

transformers = pytest.importorskip("transformers",
                                   reason="the DINOv2 oracle needs the test extra: pip install -e '.[test]'")


def hf_model(registers: bool, depth: int = 3, seed: int = 0):
    """A random Hugging Face DINOv2-S (or with registers) with non-trivial LayerScale, in float64."""
    cls = transformers.Dinov2WithRegistersModel if registers else transformers.Dinov2Model
    cfg_cls = transformers.Dinov2WithRegistersConfig if registers else transformers.Dinov2Config
    extra = {"num_register_tokens": 4} if registers else {}
    cfg = cfg_cls(hidden_size=384, num_hidden_layers=depth, num_attention_heads=6, intermediate_size=1536,
                  patch_size=14, image_size=518, layerscale_value=0.3, **extra)
    torch.manual_seed(seed)
    model = cls(cfg).double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_scale" in name:
                p.uniform_(0.1, 0.6)
            elif name.endswith("position_embeddings") or name.endswith("cls_token") or "register" in name:
                p.normal_(0, 0.5)
    return model


def hf_taps(model, pixels, taps, registers):
    out = model(pixel_values=pixels, output_hidden_states=True)
    n_prefix = 1 + (4 if registers else 0)
    rows, cols = pixels.shape[-2] // 14, pixels.shape[-1] // 14
    maps = []
    for t in taps:
        h = model.layernorm(out.hidden_states[t + 1])[:, n_prefix:]
        maps.append(h.transpose(1, 2).reshape(pixels.shape[0], -1, rows, cols))
    return maps


@pytest.mark.parametrize("registers", [False, True])
def test_hf_folder_matches_transformers_at_518(tmp_path, registers):
    """At 518 px (37x37 tokens, no interpolation) our taps equal transformers' hidden states after its final norm."""
    model = hf_model(registers)
    model.save_pretrained(tmp_path / "hf")
    name = "dinov2_vits14_reg" if registers else "dinov2_vits14"
    bb = build_backbone(name, tmp_path / "hf", depth=3, taps=(0, 1, 2))
    bb.vit.double()
    x = torch.randn(1, 3, 37 * 16, 37 * 16, dtype=torch.float64)
    ours = bb(x)
    ref = hf_taps(model, resize_to_patch_grid(x, 14, 16), (0, 1, 2), registers)
    assert [tuple(f.shape) for f in ours] == [(1, 384, 37, 37)] * 3
    worst = max((a.double() - b).abs().max().item() for a, b in zip(ours, ref, strict=True))
    print(f"{name}: max abs vs transformers at 518 px = {worst:.2e}")
    assert worst <= 1e-5


def test_hf_folder_and_meta_file_load_to_the_same_tensors(tmp_path):
    model = hf_model(registers=True, seed=1)
    model.save_pretrained(tmp_path / "hf")
    from safetensors.torch import load_file

    meta = hf_dinov2_to_meta(load_file(str(tmp_path / "hf" / "model.safetensors")))
    (tmp_path / "meta").mkdir()
    torch.save(meta, tmp_path / "meta" / "dinov2_vits14_reg4_pretrain.pth")
    a = build_backbone("dinov2_vits14_reg", tmp_path / "hf", depth=3, taps=(0, 1, 2))
    b = build_backbone("dinov2_vits14_reg", tmp_path / "meta" / "dinov2_vits14_reg4_pretrain.pth", depth=3,
                       taps=(0, 1, 2))
    sa, sb = a.vit.state_dict(), b.vit.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _meta_interpolation(pos, rows, cols):
    """Written from Meta's DINOv2 ``interpolate_pos_encoding`` (interpolate_offset 0.1, no antialias)."""
    n = pos.shape[1]
    m = int(math.sqrt(n))
    grid = pos.float().reshape(1, m, m, -1).permute(0, 3, 1, 2)  # Meta interpolates in float32
    sx, sy = float(rows + 0.1) / m, float(cols + 0.1) / m
    out = F.interpolate(grid, scale_factor=(sx, sy), mode="bicubic", antialias=False)
    return out.permute(0, 2, 3, 1).reshape(1, rows * cols, -1).to(pos.dtype)


@pytest.mark.parametrize("rows,cols", [(16, 16), (4, 6), (37, 20), (40, 40)])
def test_position_embedding_follows_metas_formula(rows, cols):
    pos = torch.randn(1, 37 * 37, 8, dtype=torch.float64)
    ours = interpolate_pos_embed(pos, rows, cols)
    assert torch.equal(ours, _meta_interpolation(pos, rows, cols))
    # transformers interpolates to the size directly (no +0.1 offset): a different, close answer
    hf = F.interpolate(pos.reshape(1, 37, 37, -1).permute(0, 3, 1, 2), size=(rows, cols), mode="bicubic",
                       antialias=False).permute(0, 2, 3, 1).reshape(1, rows * cols, -1)
    assert not torch.allclose(ours, hf)


@pytest.mark.parametrize("size", [(64, 64), (64, 96), (112, 48)])
def test_patch14_tokens_land_on_the_16_grid(tmp_path, size):
    path = write_meta_checkpoint("dinov2_vits14", tmp_path, depth=2, seed=2)
    bb = build_backbone("dinov2_vits14", path, depth=2, taps=(0, 1))
    feats = bb(torch.randn(2, 3, *size))
    assert [tuple(f.shape) for f in feats] == [(2, 384, size[0] // 16, size[1] // 16)] * 2


def test_every_dinov2_entry_builds_and_loads_its_meta_file(tmp_path):
    for name, spec in BACKBONES.items():
        if spec.family != "dinov2":
            continue
        path = write_meta_checkpoint(name, tmp_path / name, depth=1)
        assert path.name == f"dinov2_{spec.arch}_pretrain.pth"
        bb = build_backbone(name, path, depth=1, taps=(0,))
        assert bb(torch.randn(1, 3, 32, 32))[0].shape == (1, spec.embed_dim, 2, 2)
        assert len(build_backbone(name, "random", device="meta").vit.blocks) == spec.depth


def test_wrong_dinov2_variant_names_the_right_one(tmp_path):
    path = write_meta_checkpoint("dinov2_vits14", tmp_path)
    with pytest.raises(DinoUNetError, match="looks like dinov2_vits14, not dinov2_vits14_reg"):
        build_backbone("dinov2_vits14_reg", path)
    with pytest.raises(DinoUNetError, match="looks like dinov2_vits14, not dinov3_vits16"):
        build_backbone("dinov3_vits16", path)


def test_dinov2_weights_folder_and_unet(tmp_path, monkeypatch):
    from nnunet_dino.network import DinoUNet

    write_meta_checkpoint("dinov2_vits14", tmp_path, depth=12)
    monkeypatch.setenv("nnUNet_dino_weights", str(tmp_path))
    net = DinoUNet(1, 2, backbone="dinov2_vits14").eval()
    assert net.backbone.weights_file == "dinov2_vits14_pretrain.pth"
    with torch.no_grad():
        assert net(torch.randn(1, 1, 70, 90)).shape == (1, 2, 70, 90)


def test_hf_config_names_the_entry(tmp_path):
    from nnunet_dino.backbones import hf_config_entry

    model = hf_model(registers=True, depth=12)
    model.save_pretrained(tmp_path / "hf")
    assert hf_config_entry(tmp_path / "hf")[0] == "dinov2_vits14_reg"
    with pytest.raises(DinoUNetError, match="config.json .* looks like dinov2_vits14_reg, not dinov2_vitb14"):
        build_backbone("dinov2_vitb14", tmp_path / "hf")


@pytest.mark.parametrize("name", [n for n, s in BACKBONES.items() if s.family == "dinov2"])
def test_every_dinov2_entry_loads_its_hf_folder(tmp_path, name):
    spec = BACKBONES[name]
    registers = name.endswith("_reg")
    cls = transformers.Dinov2WithRegistersModel if registers else transformers.Dinov2Model
    cfg_cls = transformers.Dinov2WithRegistersConfig if registers else transformers.Dinov2Config
    cfg = cfg_cls(hidden_size=spec.embed_dim, num_hidden_layers=1, num_attention_heads=spec.num_heads, patch_size=14,
                  image_size=518, use_swiglu_ffn=spec.swiglu, mlp_ratio=4, layerscale_value=0.3,
                  **({"num_register_tokens": 4} if registers else {}))
    torch.manual_seed(0)
    model = cls(cfg).eval()
    model.save_pretrained(tmp_path / "hf")
    bb = build_backbone(name, tmp_path / "hf", depth=1, taps=(0,))
    x = torch.randn(1, 3, 64, 48)
    ours = bb(x)[0]
    ref = hf_taps(model, resize_to_patch_grid(x, 14, 16), (0,), registers)[0]
    assert ours.shape == (1, spec.embed_dim, 4, 3)
    # 56x42 px: both interpolate the 37x37 position grid, with different formulas (Meta's +0.1 offset vs size)
    cos = F.cosine_similarity(ours.flatten(), ref.flatten(), dim=0).item()
    assert cos > 0.99, cos


@pytest.mark.parametrize("registers", [False, True])
@pytest.mark.parametrize("size", [(64, 48), (96, 160)])
def test_taps_equal_metas_forward_at_interpolated_sizes(tmp_path, registers, size):
    """Away from 518 px: transformers' forward with Meta's interpolation put in (the only part that differs from
    Meta's DINOv2 code) equals our taps on the same resized input."""
    model = hf_model(registers, seed=3)
    model.save_pretrained(tmp_path / "hf")
    emb = model.embeddings

    def metas(embeddings, height, width):
        pos = emb.position_embeddings
        if embeddings.shape[1] - 1 == pos.shape[1] - 1 and height == width:
            return pos
        return torch.cat([pos[:, :1], _meta_interpolation(pos[:, 1:], height // 14, width // 14)], dim=1)

    emb.interpolate_pos_encoding = metas
    name = "dinov2_vits14_reg" if registers else "dinov2_vits14"
    bb = build_backbone(name, tmp_path / "hf", depth=3, taps=(0, 1, 2))
    bb.vit.double()
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    ours = bb(x)
    ref = hf_taps(model, resize_to_patch_grid(x, 14, 16), (0, 1, 2), registers)
    worst = max((a.double() - b).abs().max().item() for a, b in zip(ours, ref, strict=True))
    assert [tuple(f.shape[-2:]) for f in ours] == [(size[0] // 16, size[1] // 16)] * 3
    assert worst <= 1e-5, worst
