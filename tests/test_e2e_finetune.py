"""LoRA and last-k trainers through the stock console scripts: train, resume with --c, predict, export (CPU)."""
import pytest
import torch
from e2e_support import BIN, run

from nnunet_dino.backbones.lora import LoRALinear
from nnunet_dino.commands.export import export_model, load_fold
from nnunet_dino.nnunet.checkpoints import read_checkpoint

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("trainer, marker", [("nnUNetTrainerDinoUNet_LoRA_smoke", "lora_"),
                                             ("nnUNetTrainerDinoUNet_LastK_smoke", "blocks.")])
def test_fine_tuning_trainer_end_to_end(trained_smoke, tmp_path, trainer, marker):
    env, raw = trained_smoke.env, trained_smoke.raw
    out = run([BIN / "nnUNetv2_train", "990", "2d", "0", "-tr", trainer, "-device", "cpu"], env)
    model = trained_smoke.model.parent / f"{trainer}__nnUNetPlans__2d"
    log = "".join(p.read_text() for p in (model / "fold_0").glob("training_log_*.txt"))
    assert "of which backbone" in log, out[-2000:]
    ckpt = read_checkpoint(model / "fold_0" / "checkpoint_final.pth")
    backbone_keys = [k for k in ckpt["network_weights"] if k.startswith("backbone.")]
    assert backbone_keys and all(marker in k for k in backbone_keys)  # only what was trained travels
    lr = "0.01" if "LoRA" in trainer else "0.001"  # the backbone's own parameter group: 1/10 of 1e-2 for last-k
    assert f"at learning rate {lr})" in log
    run([BIN / "nnUNetv2_train", "990", "2d", "0", "-tr", trainer, "-device", "cpu", "--c"], env)  # resumes
    run([BIN / "nnUNetv2_predict", "-i", raw / "imagesTs", "-o", tmp_path / "pred", "-d", "990", "-c", "2d",
         "-tr", trainer, "-f", "0", "-device", "cpu", "--disable_tta"], env)
    assert len(list((tmp_path / "pred").glob("*.png"))) == 4
    network = load_fold(model, 0)[0]
    assert any(isinstance(m, LoRALinear) for m in network.modules()) == ("LoRA" in trainer)
    traced = torch.jit.load(str(export_model(model, [0], tmp_path / "ts", fmt="torchscript", size=[96, 128])
                                / "fold_0.pt"))  # LoRA merged into the weights
    x = torch.randn(1, 1, 96, 128)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), network(x), atol=1e-4, rtol=1e-4)
