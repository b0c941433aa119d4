"""Partial fine-tuning: LoRA and last-k blocks on the tiny backbone (fast tier)."""
import pytest
import torch

from nnunet_dino.backbones.lora import LoRALinear, merge_lora
from nnunet_dino.errors import DinoUNetError
from nnunet_dino.network import DinoUNet
from nnunet_dino.nnunet.scheduler import GroupPolyLRScheduler


def tiny(**kw) -> DinoUNet:
    torch.manual_seed(0)
    net = DinoUNet(1, 3, backbone="dinov3_test_tiny", backbone_weights="random", checkpoint_extractors=False, **kw)
    for block in net.backbone.vit.blocks:  # the random ViT's layer scale (1e-5) would hide any change to a block
        for name in ("gamma_1", "gamma_2"):
            if isinstance(getattr(block, name, None), torch.nn.Parameter):
                getattr(block, name).data.fill_(1.0)
    return net


def randomise_lora(net: DinoUNet) -> None:
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_b" in name:
                p.normal_(std=0.05)


def test_lora_trains_only_its_factors_and_stays_small():
    frozen, lora = tiny(), tiny(backbone_lora_rank=4)
    counts = lora.trainable_parameter_counts()
    blocks = len(lora.backbone.vit.blocks)
    dim = lora.backbone.embed_dim
    assert counts["backbone_adapted"] == blocks * 4 * ((dim + 3 * dim) + (dim + dim))  # qkv + proj, A and B
    assert counts["frozen_backbone"] == frozen.trainable_parameter_counts()["frozen_backbone"]
    backbone_keys = [k for k in lora.state_dict() if k.startswith("backbone.")]
    assert backbone_keys and all("lora_" in k for k in backbone_keys)  # the base weights never travel
    assert not [k for k in frozen.state_dict() if k.startswith("backbone.")]
    x = torch.randn(2, 1, 64, 64)
    lora.load_state_dict(frozen.state_dict(), strict=False)  # same decoder etc.; LoRA factors as initialised
    with torch.no_grad():
        assert torch.equal(lora.eval()(x), frozen.eval()(x))  # B = 0: training starts from the frozen model
    lora.train()
    lora(x).sum().backward()
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert all(lora.get_parameter(n).grad is not None for n in trainable)  # DDP: no unused parameter
    assert not lora.backbone.vit.training  # eval mode: no dropout or RoPE jitter while LoRA trains


def test_lora_round_trips_and_merges():
    lora = tiny(backbone_lora_rank=4).eval()
    randomise_lora(lora)
    x = torch.randn(1, 1, 64, 96)
    with torch.no_grad():
        before = lora(x)
        base = tiny().eval()
        base.load_state_dict(lora.state_dict(), strict=False)
        assert (before - base(x)).abs().max() > 1e-3  # the factors matter
        again = tiny(backbone_lora_rank=4).eval()
        again.load_state_dict(lora.state_dict())
        assert torch.equal(again(x), before)
        assert merge_lora(again) == 2 * len(again.backbone.vit.blocks)
        assert not any(isinstance(m, LoRALinear) for m in again.modules())
        torch.testing.assert_close(again(x), before, atol=1e-5, rtol=1e-5)


def test_lora_checkpoint_refuses_what_it_was_not_trained_with():
    lora = tiny(backbone_lora_rank=4)
    with pytest.raises(RuntimeError, match="lora_a"):
        lora.load_state_dict(tiny().state_dict())  # a frozen checkpoint would leave LoRA at init silently
    other = DinoUNet(1, 3, backbone="dinov3_test_tiny", backbone_weights="random", backbone_lora_rank=4)
    other.backbone.weights_sha256 = "f" * 64
    with pytest.raises(DinoUNetError, match="SHA-256"):
        other.load_state_dict(lora.state_dict())


def test_last_k_blocks_train_and_travel():
    net = tiny(backbone_trainable_blocks=2)
    last = max(net.backbone.tap_layers)
    trainable_blocks = {n.split(".")[3] for n, p in net.named_parameters()
                        if p.requires_grad and n.startswith("backbone.")}
    assert trainable_blocks == {str(last - 1), str(last)}
    assert {k.split(".")[3] for k in net.state_dict() if k.startswith("backbone.")} == trainable_blocks
    net.train()
    net(torch.randn(2, 1, 64, 64)).sum().backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)


@pytest.mark.parametrize("kwargs, message", [
    ({"backbone_lora_rank": 4, "backbone_trainable_blocks": 1}, "not both"),
    ({"backbone_trainable_blocks": 9}, "between 1 and 4"),
    ({"backbone_trainable_blocks": 1, "backbone_dtype": "bfloat16"}, "needs the backbone in float32"),
    ({"backbone_lora_rank": -1}, "positive integer"),
])
def test_fine_tuning_refusals(kwargs, message):
    with pytest.raises(DinoUNetError, match=message):
        DinoUNet(1, 3, backbone="dinov3_test_tiny", backbone_weights="random", **kwargs)


def test_each_group_keeps_its_learning_rate_on_the_poly_schedule():
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [a], "lr": 1e-2}, {"params": [b], "lr": 1e-3}], 1e-2)
    sched = GroupPolyLRScheduler(opt, max_steps=10)
    sched.step(5)  # nnU-Net steps with the epoch
    factor = (1 - 5 / 10) ** 0.9
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-2 * factor, 1e-3 * factor])


def test_fine_tuning_trainers_pin_their_arguments():
    from nnunet_dino.nnunet.finetune_trainers import (
        nnUNetTrainerDinoUNet_B_LastK,
        nnUNetTrainerDinoUNet_LoRA,
        nnUNetTrainerDinoUNet_LoRA_smoke,
    )
    from nnunet_dino.nnunet.plans import network_defaults

    block = {"network_class_name": "nnunet_dino.network.DinoUNet",
             "arch_kwargs": {**network_defaults(), "backbone": None},
             "_kw_requires_import": []}
    lora = nnUNetTrainerDinoUNet_LoRA.dino_arch({**block, "arch_kwargs": dict(block["arch_kwargs"])})["arch_kwargs"]
    assert lora["backbone_lora_rank"] == 8 and lora["backbone"] is None  # follows the plans (ViT-S when open)
    lastk = nnUNetTrainerDinoUNet_B_LastK.dino_arch({**block, "arch_kwargs": dict(block["arch_kwargs"])})
    assert lastk["arch_kwargs"]["backbone_trainable_blocks"] == 2
    assert lastk["arch_kwargs"]["backbone"] == "dinov3_vitb16"
    assert nnUNetTrainerDinoUNet_B_LastK.backbone_learning_rate == pytest.approx(1e-4)
    planned = {**block, "arch_kwargs": {**block["arch_kwargs"], "backbone_lora_rank": 16}}
    with pytest.raises(DinoUNetError, match="backbone_lora_rank 16 but nnUNetTrainerDinoUNet_LoRA_smoke pins 8"):
        nnUNetTrainerDinoUNet_LoRA_smoke.dino_arch(planned)
