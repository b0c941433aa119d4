"""DinoUNet: shapes, channels, training only the trainable parts, parameter counts, small state dicts."""
import io

import pytest
import torch

from nnunet_dino.errors import DinoUNetError
from nnunet_dino.network import DinoUNet
from nnunet_dino.testing.synthetic import write_meta_checkpoint


def tiny(channels=1, classes=3, **kw):
    return DinoUNet(channels, classes, backbone="dinov3_test_tiny", **kw)


@pytest.mark.parametrize("channels", [1, 2, 3, 4, 5])
def test_any_channel_count(channels):
    net = tiny(channels).eval()
    x = torch.randn(2, channels, 64, 64)
    assert net(x).shape == (2, 3, 64, 64)
    if channels != 3:  # every input channel reaches the ViT input (none dropped)
        w = net.channel_mixer.mix.weight[:, :, 0, 0]
        assert (w.abs().sum(0) > 0).all()
    if channels == 1:
        assert torch.allclose(net.to_rgb(x), x.repeat(1, 3, 1, 1))
    if channels == 2:
        assert torch.allclose(net.to_rgb(x), x[:, [0, 1, 0]])


def test_reference_channel_mode_truncates_like_the_reference():
    net = tiny(5, channel_mode="reference").eval()
    x = torch.randn(1, 5, 64, 64)
    assert net.channel_mixer is None and torch.equal(net.to_rgb(x), x[:, :3])


@pytest.mark.parametrize("size", [(64, 64), (96, 160), (100, 150), (33, 47)])
def test_any_size(size):
    net = tiny().eval()
    assert net(torch.randn(1, 1, *size)).shape == (1, 3, *size)


def test_vits16_at_512():
    net = DinoUNet(1, 2, backbone="dinov3_vits16", backbone_weights="random").eval()
    with torch.no_grad():
        assert net(torch.randn(1, 1, 512, 512)).shape == (1, 2, 512, 512)


def test_deep_supervision_shapes_and_toggle():
    net = tiny(deep_supervision=True).eval()
    out = net(torch.randn(2, 1, 64, 96))
    assert [tuple(o.shape) for o in out] == [(2, 3, 64, 96), (2, 3, 32, 48), (2, 3, 16, 24)]
    net.decoder.deep_supervision = False
    assert net(torch.randn(2, 1, 64, 96)).shape == (2, 3, 64, 96)
    off = tiny()
    assert off.decoder.aux_heads is None
    off.decoder.deep_supervision = True  # nnU-Net sets this after validation; harmless without aux heads
    assert off(torch.randn(1, 1, 64, 64)).shape == (1, 3, 64, 64)
    off.load_state_dict(net.state_dict())  # a deep-supervision checkpoint loads for inference


def test_training_changes_only_trainable_parts():
    torch.manual_seed(0)
    net = tiny(1, 2, checkpoint_extractors=True)
    frozen = {k: v.clone() for k, v in net.backbone.state_dict().items()}
    before = {n: p.detach().clone() for n, p in net.named_parameters() if p.requires_grad}
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=1e-2, momentum=0.9)
    net.train()
    for _ in range(3):
        x, y = torch.randn(2, 1, 64, 64), torch.randint(0, 2, (2, 64, 64))
        loss = torch.nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(torch.equal(v, net.backbone.state_dict()[k]) for k, v in frozen.items())
    assert all(p.grad is None for p in net.backbone.parameters())
    trainable = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    assert all(p.grad is not None for _, p in trainable)  # every trainable tensor is in the graph (DDP-safe)
    changed = {n for n, p in trainable if not torch.equal(p, before[n])}
    for part in ("channel_mixer", "adapter.spm", "adapter.interactions", "adapter.up", "adapter.norms",
                 "fapm.shared_basis", "fapm.branches", "upsample", "decoder"):
        assert any(n.startswith(part) for n in changed), part
    # the rest are biases right before InstanceNorm (zero gradient by construction) or 1e-9 updates of norm scales
    assert len(changed) > 0.9 * len(trainable)


@pytest.mark.parametrize("backbone,reference", [("dinov3_vits16", 6.20e6), ("dinov3_vitb16", 13.18e6)])
def test_trainable_parameters_match_reference(backbone, reference):
    with torch.device("meta"):
        net = DinoUNet(1, 2, backbone=backbone, backbone_weights="random")
    counts = net.trainable_parameter_counts()
    print(backbone, {k: f"{v / 1e6:.3f}M" for k, v in counts.items()})
    assert abs(counts["total"] - reference) / reference < 0.01
    if backbone == "dinov3_vits16":
        for part, ref in [("adapter", 3.70e6), ("fapm", 1.39e6), ("upsampling", 0.35e6), ("decoder", 0.76e6)]:
            assert abs(counts[part] - ref) / ref < 0.02


def test_no_initialize_method():
    assert not hasattr(DinoUNet, "initialize")


def test_small_state_dict_and_fingerprint_refusal(tmp_path):
    net = DinoUNet(1, 2, backbone="dinov3_vits16", backbone_weights="random")
    sd = net.state_dict()
    assert not any(k.startswith("backbone.") for k in sd)
    assert sd["_extra_state"]["backbone"] == "dinov3_vits16"
    buf = io.BytesIO()
    torch.save(sd, buf)
    assert buf.tell() < 30e6  # 6.2 M fp32 parameters, no 86 MB backbone
    net.load_state_dict(sd)  # strict load works without backbone keys
    path = write_meta_checkpoint("dinov3_vits16", tmp_path)
    other = DinoUNet(1, 2, backbone="dinov3_vits16", backbone_weights=path)
    with pytest.raises(DinoUNetError, match="dinov3_vits16 weights found, .* differ from those this model was "
                                            "trained with"):
        other.load_state_dict(sd)
    with pytest.raises(DinoUNetError, match="trained with backbone dinov3_test_tiny"):
        net.load_state_dict(tiny(1, 2).state_dict(), strict=False)


def test_expected_sha_refuses_other_file(tmp_path):
    path = write_meta_checkpoint("dinov3_test_tiny", tmp_path)
    with pytest.raises(DinoUNetError, match="differ from those this model was trained with"):
        DinoUNet(1, 2, backbone="dinov3_test_tiny", backbone_weights=path, backbone_weights_sha256="0" * 64)


def test_3d_conv_op_refused():
    with pytest.raises(DinoUNetError, match="2D only"):
        tiny(conv_op=torch.nn.Conv3d)


# --- encoder_scale: the token grid without re-preprocessing ------------------------------------------------------
@pytest.mark.parametrize("scale", [1, 2, 4])
@pytest.mark.parametrize("size", [(64, 64), (96, 160), (33, 47)])
def test_encoder_scale_feeds_the_encoder_more_tokens_and_returns_logits_at_the_patch_size(scale, size):
    net = tiny(encoder_scale=scale).eval()
    seen = []
    net.backbone.register_forward_hook(lambda m, args, out: seen.append((tuple(args[0].shape), tuple(out[0].shape))))
    with torch.no_grad():
        out = net(torch.randn(2, 1, *size))
    assert out.shape == (2, 3, *size)
    padded = [-(-s // 32) * 32 for s in size]
    if padded[0] * padded[1] <= 32 * 32:
        padded[1] += 32
    assert seen[0][0] == (2, 3, padded[0] * scale, padded[1] * scale)        # the image the ViT gets
    assert seen[0][1][-2:] == (padded[0] * scale // 16, padded[1] * scale // 16)  # its token grid


@pytest.mark.parametrize("scale", [2, 4])
def test_encoder_scale_trains_every_trainable_parameter(scale):
    """No trainable parameter without a gradient (DDP would stop), deep-supervision outputs at the patch's scales."""
    net = tiny(encoder_scale=scale, deep_supervision=True).train()
    out = net(torch.randn(2, 1, 64, 96))
    assert [tuple(o.shape) for o in out] == [(2, 3, 64, 96), (2, 3, 32, 48), (2, 3, 16, 24)]
    sum(o.float().mean() for o in out).backward()
    unused = [n for n, p in net.named_parameters() if p.requires_grad and p.grad is None]
    assert unused == []
    assert (net.upsample is None) == (scale == 4)  # at 4x the adapter's levels already sit at the skip sizes


def test_encoder_scale_1_is_the_reference_network():
    """Scale 1 builds and computes exactly what a network without the option does (same state dict keys, logits)."""
    torch.manual_seed(0)
    a = tiny().eval()
    torch.manual_seed(0)
    b = tiny(encoder_scale=1).eval()
    assert a.state_dict().keys() == b.state_dict().keys()
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


@pytest.mark.parametrize("bad", [0, 3, 8, "2", 1.5])
def test_encoder_scale_refuses_other_values(bad):
    with pytest.raises(DinoUNetError, match=r"encoder_scale .* valid choices: 1, 2, 4"):
        tiny(encoder_scale=bad)


def test_vit_feature_norm_adds_the_tapped_maps_at_unit_scale():
    """False is the reference (the maps added as returned); True adds each token layer-normalised over channels."""
    import torch.nn.functional as F

    from nnunet_dino.network.adapter import DinoAdapter

    torch.manual_seed(0)
    ref = DinoAdapter(32, spm_channels=8, num_heads=4, use_checkpoint=False).eval()
    normed = DinoAdapter(32, spm_channels=8, num_heads=4, use_checkpoint=False, vit_feature_norm=True).eval()
    normed.load_state_dict(ref.state_dict())  # no parameters of its own
    image = torch.randn(1, 3, 64, 64)
    feats = [5 * torch.randn(1, 32, 4, 4) + 20 for _ in range(4)]  # a pretrained ViT's scale and offsets
    unit = [F.layer_norm(f.permute(0, 2, 3, 1), (32,)).permute(0, 3, 1, 2) for f in feats]
    with torch.no_grad():
        # the same as handing the reference unit-scale maps (its extractors layer-normalise the tokens they read)
        torch.testing.assert_close(normed(image, feats), ref(image, unit))
        assert not torch.allclose(ref(image, feats)[0], normed(image, feats)[0])
    assert tiny(vit_feature_norm=True).adapter.vit_feature_norm and not tiny().adapter.vit_feature_norm
