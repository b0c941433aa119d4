"""CUDA-only checks (skipped without a GPU; run by benchmarks/gpu_check.sh on a lent GPU)."""
import pytest
import torch

from nnunet_dino.backbones import build_backbone
from nnunet_dino.network import DinoUNet
from nnunet_dino.network.deformable_attention import MultiScaleDeformableAttention

pytestmark = pytest.mark.gpu
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
def test_deformable_attention_cuda_equals_cpu():
    torch.manual_seed(0)
    attn = MultiScaleDeformableAttention(64, 16, 1, 4, 0.5)
    attn.sampling_offsets.weight.data.normal_(0, 0.05)
    attn.attention_weights.weight.data.normal_(0, 0.05)
    q, feat = torch.randn(2, 84, 64, requires_grad=True), torch.randn(2, 16, 64, requires_grad=True)
    refs = torch.rand(1, 84, 1, 2)
    out_cpu = attn(q, refs, feat, [(4, 4)])
    out_cpu.square().sum().backward()
    g_cpu = q.grad.clone()
    q.grad = None
    attn_gpu = attn.cuda()
    qc, fc = q.detach().cuda().requires_grad_(), feat.detach().cuda()
    out_gpu = attn_gpu(qc, refs.cuda(), fc, [(4, 4)])
    out_gpu.square().sum().backward()
    assert torch.allclose(out_cpu, out_gpu.cpu(), atol=1e-4, rtol=1e-4)
    assert torch.allclose(g_cpu, qc.grad.cpu(), atol=1e-3, rtol=1e-3)


@cuda
def test_backbone_bf16_autocast_close_to_fp32():
    bb = build_backbone("dinov3_vits16", "random").cuda()
    x = torch.randn(1, 3, 224, 224, device="cuda")
    auto = bb(x)
    bb.autocast_dtype = None
    full = bb(x)
    for a, f in zip(auto, full):
        assert a.dtype == torch.float32
        assert ((a - f).norm() / f.norm()).item() < 3e-2


@cuda
def test_dinounet_cuda_matches_cpu_and_fp16_amp_is_finite():
    torch.manual_seed(0)
    net = DinoUNet(1, 3, backbone="dinov3_test_tiny", backbone_autocast=False).eval()
    x = torch.randn(1, 1, 96, 128)
    with torch.no_grad():
        ref = net(x)
        out = net.cuda()(x.cuda())
        with torch.autocast("cuda", dtype=torch.float16):
            amp = net(x.cuda())
    assert torch.allclose(ref, out.cpu(), atol=1e-3, rtol=1e-3)
    assert torch.isfinite(amp).all()
