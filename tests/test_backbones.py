"""Backbones: Meta-format files load through the public path and reproduce Meta's tapped features."""
import json
from pathlib import Path

import pytest
import torch
from meta_reference import meta_reference_features

from nnunet_dino.backbones import BACKBONES, build_backbone
from nnunet_dino.backbones.weights import file_sha256
from nnunet_dino.errors import DinoUNetError
from nnunet_dino.testing.synthetic import meta_state_dict, write_meta_checkpoint


def _max_rel(a, b):
    return max(((x.double() - y).norm() / y.norm()).item() for x, y in zip(a, b))


@pytest.mark.parametrize("name,heads,swiglu,qkv_bias", [
    ("dinov3_vits16", 6, False, False), ("dinov3_vits16", 6, False, True), ("dinov3_vits16plus", 6, True, False),
])
def test_meta_file_reproduces_meta_features(tmp_path, name, heads, swiglu, qkv_bias):
    path = write_meta_checkpoint(name, tmp_path, depth=3, qkv_bias=qkv_bias, seed=3)
    bb = build_backbone(name, path, depth=3, taps=(0, 1, 2))
    for size in [(64, 64), (48, 80)]:  # square and non-square
        x = torch.randn(2, 3, *size)
        feats = bb(x)
        ref = meta_reference_features(torch.load(path), x, (0, 1, 2), heads, swiglu)
        assert [f.shape for f in feats] == [(2, 384, size[0] // 16, size[1] // 16)] * 3
        assert _max_rel(feats, ref) < 2e-6


def test_full_vits16_meta_file(tmp_path):
    path = write_meta_checkpoint("dinov3_vits16", tmp_path, seed=1)
    bb = build_backbone("dinov3_vits16", path)
    assert bb.tap_layers == (2, 5, 8, 11) and bb.embed_dim == 384 and bb.patch_size == 16
    x = torch.randn(1, 3, 64, 96)
    assert _max_rel(bb(x), meta_reference_features(torch.load(path), x, (2, 5, 8, 11), 6)) < 2e-6


def test_rope_periods_copy_matters(tmp_path):
    """Meta's files store bf16-rounded periods; without copying them, features differ measurably."""
    path = write_meta_checkpoint("dinov3_vits16", tmp_path, depth=4, seed=2)
    bb = build_backbone("dinov3_vits16", path, depth=4, taps=(1, 3))
    x = torch.randn(1, 3, 64, 64)
    ref = meta_reference_features(torch.load(path), x, (1, 3), 6)
    exact = _max_rel(bb(x), ref)
    bb.vit.rope.periods = bb.vit.rope._compute_periods()  # what plain timm would use
    plain = _max_rel(bb(x), ref)
    assert exact < 2e-6 and plain > 20 * exact and plain > 1e-5


def test_frozen_and_deterministic_under_train(tmp_path):
    bb = build_backbone("dinov3_test_tiny")
    parent = torch.nn.Sequential(bb)
    parent.train()
    assert not bb.vit.training
    assert all(not p.requires_grad for p in bb.parameters())
    x = torch.randn(1, 3, 32, 48, requires_grad=True)
    a, b = bb(x), bb(x)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not a[0].requires_grad


def test_random_backbone_is_reproducible():
    a, b = build_backbone("dinov3_test_tiny"), build_backbone("dinov3_test_tiny", "random")
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert a.fingerprint()["weights_sha256"] == "random"


@pytest.mark.parametrize("name", [n for n in BACKBONES if n != "dinov3_test_tiny"])
def test_every_registry_entry_builds_on_meta(name):
    bb = build_backbone(name, "random", device="meta")
    spec = BACKBONES[name]
    assert len(bb.vit.blocks) == spec.depth and bb.embed_dim == spec.embed_dim
    assert sum(p.numel() for p in bb.parameters()) > 1e7


@pytest.mark.parametrize("name", ["dinov3_vitb16", "dinov3_vitl16", "dinov3_vith16plus", "dinov3_vit7b16"])
def test_big_layouts_load_at_reduced_depth(tmp_path, name):
    dataset = "sat493m" if name in ("dinov3_vitl16", "dinov3_vit7b16") else "lvd1689m"
    path = write_meta_checkpoint(name, tmp_path, depth=2, dataset=dataset)
    assert f"pretrain_{dataset}-" in path.name
    bb = build_backbone(name, path, depth=2, taps=(0, 1))
    feats = bb(torch.randn(1, 3, 32, 32))
    assert [f.shape for f in feats] == [(1, BACKBONES[name].embed_dim, 2, 2)] * 2


def test_weights_folder_resolution_and_hash_cache(tmp_path, monkeypatch):
    path = write_meta_checkpoint("dinov3_vits16", tmp_path / "w", depth=2)
    monkeypatch.setenv("nnUNet_dino_weights", str(tmp_path / "w"))
    bb = build_backbone("dinov3_vits16", depth=2, taps=(0, 1))
    assert bb.weights_file == path.name and bb.weights_sha256 == file_sha256(path)
    assert path.name.endswith(f"-{bb.weights_sha256[:8]}.pth")
    cache = "".join(p.read_text() for p in (tmp_path / "cache" / "nnunet_dino" / "verified").glob("*.json"))
    assert bb.weights_sha256 in cache


def test_missing_weights_error_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_dino_weights", str(tmp_path))
    with pytest.raises(DinoUNetError) as e:
        build_backbone("dinov3_vitb16")
    msg = str(e.value)
    assert "dinov3_vitb16_pretrain_lvd1689m" in msg and "nnUNet_dino_weights" in msg and str(tmp_path) in msg
    assert "ai.meta.com" in msg and "\n" not in msg


def test_unknown_backbone_lists_choices():
    with pytest.raises(DinoUNetError, match="valid choices: dinov3_vits16"):
        build_backbone("dinov3_vits14")


def test_not_a_checkpoint_and_truncated(tmp_path):
    bad = tmp_path / "dinov3_vits16_pretrain_lvd1689m.pth"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(DinoUNetError, match="not a readable checkpoint"):
        build_backbone("dinov3_vits16", bad)
    good = write_meta_checkpoint("dinov3_vits16", tmp_path / "t", depth=2, with_hash=False)
    cut = tmp_path / "dinov3_vits16_pretrain_sat493m.pth"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(DinoUNetError, match="truncated"):
        build_backbone("dinov3_vits16", cut, depth=2, taps=(0, 1))


def test_hash_mismatch_shows_both(tmp_path):
    good = write_meta_checkpoint("dinov3_vits16", tmp_path, depth=2)
    wrong = good.with_name("dinov3_vits16_pretrain_lvd1689m-deadbeef.pth")
    good.rename(wrong)
    with pytest.raises(DinoUNetError) as e:
        build_backbone("dinov3_vits16", wrong, depth=2, taps=(0, 1))
    assert "deadbeef" in str(e.value) and file_sha256(wrong)[:8] in str(e.value)


def test_wrong_variant_says_which_it_looks_like(tmp_path):
    path = write_meta_checkpoint("dinov3_vitb16", tmp_path)
    with pytest.raises(DinoUNetError, match="looks like dinov3_vitb16, not dinov3_vits16"):
        build_backbone("dinov3_vits16", path)


@pytest.mark.parametrize("shape,match", [((1, 3, 40, 64), "multiple of the token grid 16"),
                                         ((1, 1, 64, 64), "\\(B, 3, H, W\\)")])
def test_bad_input(shape, match):
    bb = build_backbone("dinov3_test_tiny")
    with pytest.raises(DinoUNetError, match=match):
        bb(torch.randn(*shape))


META_LAYOUTS = json.loads((Path(__file__).parent / "fixtures" / "meta_layouts.json").read_text())


@pytest.mark.parametrize("name,dataset", [(n, "lvd1689m") for n, s in BACKBONES.items()
                                          if s.family == "dinov3" and not s.random_only]
                         + [("dinov3_vitl16", "sat493m")])
def test_test_files_have_metas_keys_and_shapes(name, dataset):
    """The random test files match Meta's layout (tests/fixtures/meta_layouts.json, written without timm)."""
    arch = BACKBONES[name].arch
    layout = META_LAYOUTS[arch + ("_sat493m" if dataset == "sat493m" else "")]
    expected = dict(layout["global"])
    for i in range(layout["depth"]):
        expected.update({f"blocks.{i}.{k}": v for k, v in layout["block"].items()})
    sd = meta_state_dict(name, device="meta", sat=dataset == "sat493m")
    assert {k: list(v.shape) for k, v in sd.items()} == expected
    assert sd["rope_embed.periods"].dtype == torch.bfloat16  # Meta stores them rounded to bf16


def test_rope_periods_formula_agrees_with_timm():
    from nnunet_dino.testing.synthetic import meta_rope_periods

    vit = build_backbone("dinov3_vits16", "random", depth=1, taps=(0,)).vit
    assert torch.allclose(meta_rope_periods(64), vit.rope._compute_periods(), rtol=1e-6)


def test_timm_internals_we_rely_on():
    """nnunet_dino.backbones.timm_compat uses these timm Eva internals: fail loudly if they move."""
    import timm
    from timm.models.eva import Eva, checkpoint_filter_fn  # noqa: F401

    vit = build_backbone("dinov3_test_tiny").vit
    assert isinstance(vit, Eva) and hasattr(vit, "forward_intermediates")
    assert isinstance(vit.rope.periods, torch.Tensor) and callable(vit.rope._compute_periods)
    for name in ("vit_small_patch16_dinov3_qkvb", "vit_7b_patch16_dinov3", "vit_huge_plus_patch16_dinov3"):
        assert timm.is_model(name), name
    qkvb = timm.create_model("vit_small_patch16_dinov3_qkvb", pretrained=False, depth=1, num_classes=0)
    attn = qkvb.blocks[0].attn
    assert isinstance(attn.q_bias, torch.Tensor) and hasattr(attn, "k_bias")


def test_private_torch_loader_we_rely_on(tmp_path):
    """weights._load_pth_read_only uses torch.serialization internals (the only way to map a file read-only)."""
    import torch.serialization as ts

    from nnunet_dino.backbones import weights

    for name in ("_open_zipfile_reader", "_load", "_weights_only_unpickler"):
        assert hasattr(ts, name), f"torch {torch.__version__} removed torch.serialization.{name}"
    path = write_meta_checkpoint("dinov3_test_tiny", tmp_path, with_hash=False)
    sd = weights._load_pth_read_only(path)
    ref = torch.load(path, weights_only=True)
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref)


def meta_to_hf_dinov3(sd: dict, depth: int) -> dict:
    """Meta's DINOv3 keys -> transformers' DINOv3ViTModel naming (test-side, the inverse of weights'
    hf_transformers_to_meta): q/k/v split, q and v biases (no k bias), layer_scale, gated MLP names."""
    hf = {"embeddings.cls_token": sd["cls_token"], "embeddings.mask_token": sd["mask_token"][None],
          "embeddings.register_tokens": sd["storage_tokens"], "norm.weight": sd["norm.weight"],
          "norm.bias": sd["norm.bias"], "embeddings.patch_embeddings.weight": sd["patch_embed.proj.weight"],
          "embeddings.patch_embeddings.bias": sd["patch_embed.proj.bias"]}
    for i in range(depth):
        m, h = f"blocks.{i}.", f"layer.{i}."
        q, k, v = sd[m + "attn.qkv.weight"].chunk(3)
        hf.update({h + "attention.q_proj.weight": q, h + "attention.k_proj.weight": k, h + "attention.v_proj.weight": v,
                   h + "attention.o_proj.weight": sd[m + "attn.proj.weight"],
                   h + "attention.o_proj.bias": sd[m + "attn.proj.bias"],
                   h + "layer_scale1.lambda1": sd[m + "ls1.gamma"], h + "layer_scale2.lambda1": sd[m + "ls2.gamma"]})
        if m + "attn.qkv.bias" in sd:
            qb, _, vb = sd[m + "attn.qkv.bias"].chunk(3)
            hf.update({h + "attention.q_proj.bias": qb, h + "attention.v_proj.bias": vb})
        for n in ("norm1", "norm2"):
            hf.update({h + f"{n}.weight": sd[m + f"{n}.weight"], h + f"{n}.bias": sd[m + f"{n}.bias"]})
        names = (("w1", "gate_proj"), ("w2", "up_proj"), ("w3", "down_proj")) if m + "mlp.w1.weight" in sd else (
            ("fc1", "up_proj"), ("fc2", "down_proj"))
        for meta_name, hf_name in names:
            hf.update({h + f"mlp.{hf_name}.weight": sd[m + f"mlp.{meta_name}.weight"],
                       h + f"mlp.{hf_name}.bias": sd[m + f"mlp.{meta_name}.bias"]})
    return hf


@pytest.mark.parametrize("name", [n for n, s in BACKBONES.items() if s.family == "dinov3" and s.source == ""
                                  and not s.random_only])
def test_safetensors_layouts(tmp_path, name):
    """Meta-keyed safetensors and Hugging Face transformers layouts give the same features as the .pth."""
    from safetensors.torch import save_file

    arch, depth = BACKBONES[name].arch, 1
    sd = meta_state_dict(name, depth=depth, seed=4)
    ref = build_backbone(name, write_meta_checkpoint(name, tmp_path / "p", depth=depth, seed=4), depth=depth,
                         taps=(0,))
    x = torch.randn(1, 3, 32, 48)
    st_file = tmp_path / f"dinov3_{arch}_pretrain_lvd1689m.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(st_file))
    st = build_backbone(name, st_file, depth=depth, taps=(0,))
    assert all(torch.equal(a, b) for a, b in zip(ref(x), st(x)))
    folder = tmp_path / "hf" / f"dinov3-{arch}-pretrain-lvd1689m"
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in meta_to_hf_dinov3(sd, depth).items()}, str(folder / "model.safetensors"))
    hf_bb = build_backbone(name, folder / "model.safetensors", depth=depth, taps=(0,))
    # HF files carry no RoPE periods (recomputed in fp32): equal up to the bf16 rounding of Meta's periods
    assert all(((a - b).norm() / a.norm()) < 1e-3 for a, b in zip(ref(x), hf_bb(x)))


def test_folder_prefers_lvd_and_finds_sat(tmp_path, monkeypatch):
    sat = write_meta_checkpoint("dinov3_vitl16", tmp_path, depth=1, dataset="sat493m")
    monkeypatch.setenv("nnUNet_dino_weights", str(tmp_path))
    assert build_backbone("dinov3_vitl16", depth=1, taps=(0,)).weights_file == sat.name
    lvd = write_meta_checkpoint("dinov3_vitl16", tmp_path, depth=1, seed=1)
    assert build_backbone("dinov3_vitl16", depth=1, taps=(0,)).weights_file == lvd.name
    assert build_backbone("dinov3_vitl16", sat.name, depth=1, taps=(0,)).weights_file == sat.name  # by name


def test_read_only_mapping_fallback(tmp_path, monkeypatch):
    """When the kernel refuses a copy-on-write map (files larger than RAM), the read-only mapping gives the same."""
    from nnunet_dino.backbones import weights

    path = write_meta_checkpoint("dinov3_vits16", tmp_path, depth=2)
    direct = weights.read_state_dict(path)
    real_load = torch.load

    def refuse_mmap(*args, **kwargs):
        if kwargs.get("mmap"):
            raise RuntimeError(f"unable to mmap {path.stat().st_size} bytes from file <{path}>: "
                               f"Cannot allocate memory (12)")
        return real_load(*args, **kwargs)

    monkeypatch.setattr(weights.torch, "load", refuse_mmap)
    mapped = weights.read_state_dict(path)
    assert mapped.keys() == direct.keys() and all(torch.equal(mapped[k], direct[k]) for k in direct)
    monkeypatch.setattr(weights.torch, "load", real_load)
    assert len(build_backbone("dinov3_vits16", path, depth=2, taps=(0, 1))(torch.randn(1, 3, 32, 32))) == 2


@pytest.mark.parametrize("wrap", ["bare", "teacher", "model", "state_dict"])
def test_meddinov3_checkpoint_in_its_wrappers(tmp_path, wrap):
    """MedDINOv3 CT-3M: Meta's ViT-B/16 keys, 4 storage tokens, no q/k/v bias, inside a training wrapper."""
    from nnunet_dino.testing.synthetic import meta_state_dict

    sd = meta_state_dict("meddinov3_vitb16_ct3m", depth=2, seed=7)
    assert not any("qkv.bias" in k for k in sd)
    payload = sd if wrap == "bare" else {wrap: {f"backbone.{k}": v for k, v in sd.items()}, "iteration": 3}
    path = tmp_path / "meddinov3_vitb16_ct3m.pth"
    torch.save(payload, path)
    bb = build_backbone("meddinov3_vitb16_ct3m", path, depth=2, taps=(0, 1))
    x = torch.randn(1, 3, 48, 64)
    assert _max_rel(bb(x), meta_reference_features(sd, x, (0, 1), 12)) < 2e-6
    # the same shapes as Meta's ViT-B, told apart by the absent bias keys
    with pytest.raises(DinoUNetError, match="not dinov3_vitb16"):
        build_backbone("dinov3_vitb16", path, depth=2, taps=(0, 1))
    from nnunet_dino.backbones import looks_like
    from nnunet_dino.backbones.weights import describe_state_dict

    facts = dict(describe_state_dict(sd), depth=12)  # as the full-depth file would describe itself
    assert looks_like(facts, BACKBONES.values()) == "meddinov3_vitb16_ct3m"
    meta_b = dict(describe_state_dict(meta_state_dict("dinov3_vitb16", depth=2)), depth=12)
    assert looks_like(meta_b, BACKBONES.values()) == "dinov3_vitb16"


def test_meddinov3_found_in_the_weights_folder(tmp_path, monkeypatch):
    path = write_meta_checkpoint("meddinov3_vitb16_ct3m", tmp_path, depth=2, with_hash=False)
    assert path.name == "meddinov3_vitb16_ct3m.pth"
    monkeypatch.setenv("nnUNet_dino_weights", str(tmp_path))
    assert build_backbone("meddinov3_vitb16_ct3m", depth=2, taps=(0, 1)).weights_file == path.name
    with pytest.raises(DinoUNetError, match="put the file dinov3_vitb16_pretrain_lvd1689m"):
        build_backbone("dinov3_vitb16", depth=2, taps=(0, 1))
