"""Adapter and FAPM compute what the paper's boxes say: fixed small weights and inputs, outputs recomputed here
with plain functional ops (and the explicit bilinear deformable-attention reference), not with the modules."""
import math

import torch
import torch.nn.functional as F

from nnunet_dino.network.adapter import DinoAdapter
from nnunet_dino.network.fapm import FAPM
from nnunet_dino.testing.oracles import explicit_reference


def _fill_(module, seed):
    """Deterministic, non-trivial values for every parameter and norm statistic."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) / math.sqrt(max(1, p[0].numel())))
        for name, b in module.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))


def _conv(x, conv, **kw):
    return F.conv2d(x, conv.weight, conv.bias, stride=conv.stride, padding=conv.padding, groups=conv.groups, **kw)


def _bn(x, bn):
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


def _instance_norm(x, weight, bias, eps=1e-5):
    mean, var = x.mean((2, 3), keepdim=True), x.var((2, 3), unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight[None, :, None, None] + bias[None, :, None, None]


def _lrelu(x):
    return torch.where(x > 0, x, 0.01 * x)


def fapm_reference(fapm, levels, rank):
    outs = []
    for branch, x in zip(fapm.branches, levels, strict=True):
        shared = _conv(x, fapm.shared_basis)                              # common basis (all scales)
        gamma, beta = _conv(shared, branch.film).split(rank, dim=1)      # FiLM parameters from the shared context
        z = gamma * _conv(x, branch.specific_basis) + beta                # modulated scale-specific basis
        c1, n1, _, dw, pw, n2, _, c3, se = branch.refine
        y = _lrelu(_instance_norm(_conv(z, c1), n1.weight, n1.bias))
        y = _lrelu(_instance_norm(_conv(_conv(y, dw), pw), n2.weight, n2.bias))
        y = _conv(y, c3)
        gate = torch.sigmoid(_conv(torch.relu(_conv(y.mean((2, 3), keepdim=True), se.reduce)), se.expand))
        outs.append(y * gate + (_conv(z, branch.shortcut) if isinstance(branch.shortcut, torch.nn.Conv2d) else z))
    return outs


def test_fapm_matches_functional_recomputation():
    rank = 8
    fapm = FAPM(16, (4, 8, 8, 12), rank=rank).double().eval()
    _fill_(fapm, 0)
    g = torch.Generator().manual_seed(1)
    levels = [torch.randn(2, 16, s, s + 1, generator=g, dtype=torch.float64) for s in (8, 4, 2, 2)]
    ours = fapm(levels)
    ref = fapm_reference(fapm, levels, rank)
    assert [o.shape[1] for o in ours] == [4, 8, 8, 12]
    for a, b in zip(ours, ref, strict=True):
        assert torch.allclose(a, b, atol=1e-10)
    # both shortcut kinds are exercised: a 1x1 conv when the width differs from the rank, identity when equal
    assert isinstance(fapm.branches[0].shortcut, torch.nn.Conv2d) and isinstance(fapm.branches[1].shortcut,
                                                                                  torch.nn.Identity)


def _layer_norm(x, ln):
    return F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)


def _deformable(attn, query, refs, feat, shape):
    """Deformable attention written out: offsets and weights from the query, explicit bilinear sampling."""
    bsz, nq, _ = query.shape
    heads, points = attn.num_heads, attn.num_points
    value = F.linear(feat, attn.value_proj.weight, attn.value_proj.bias).view(bsz, feat.shape[1], heads, -1)
    offsets = F.linear(query, attn.sampling_offsets.weight, attn.sampling_offsets.bias)
    offsets = offsets.view(bsz, nq, heads, 1, points, 2)
    logits = F.linear(query, attn.attention_weights.weight, attn.attention_weights.bias).view(bsz, nq, heads, points)
    weights = torch.softmax(logits, -1).view(bsz, nq, heads, 1, points)
    h, w = shape
    locations = refs.expand(bsz, -1, -1, -1)[:, :, None, :, None, :] + offsets / torch.tensor([w, h], dtype=query.dtype)
    sampled = explicit_reference(value, [shape], locations, weights)
    return F.linear(sampled, attn.output_proj.weight, attn.output_proj.bias)


def _conv_ffn(ffn, x, shapes):
    x = F.linear(x, ffn.fc1.weight, ffn.fc1.bias)
    parts, start = [], 0
    for h, w in shapes:
        grid = x[:, start:start + h * w].transpose(1, 2).reshape(x.shape[0], -1, h, w)
        parts.append(_conv(grid, ffn.dwconv).flatten(2).transpose(1, 2))
        start += h * w
    return F.linear(F.gelu(torch.cat(parts, 1)), ffn.fc2.weight, ffn.fc2.bias)


def adapter_reference(adapter, image, vit_features):
    spm = adapter.spm
    x = image
    for block in spm.stem[:3]:
        x = torch.relu(_bn(_conv(x, block[0]), block[1]))
    c4 = F.max_pool2d(x, 3, 2, 1)
    c8 = torch.relu(_bn(_conv(c4, spm.down8[0]), spm.down8[1]))
    c16 = torch.relu(_bn(_conv(c8, spm.down16[0]), spm.down16[1]))
    c32 = torch.relu(_bn(_conv(c16, spm.down32[0]), spm.down32[1]))
    c4, c8, c16, c32 = (_conv(c, p) for c, p in zip((c4, c8, c16, c32), spm.proj, strict=True))
    shapes = [tuple(c.shape[-2:]) for c in (c8, c16, c32)]
    query = torch.cat([c.flatten(2).transpose(1, 2) + adapter.level_embed[i] for i, c in enumerate((c8, c16, c32))], 1)
    refs = torch.cat([torch.stack(torch.meshgrid((torch.arange(w, dtype=image.dtype) + 0.5) / w,
                                                 (torch.arange(h, dtype=image.dtype) + 0.5) / h, indexing="xy"),
                                  -1).reshape(-1, 2) for h, w in shapes])[None, :, None]
    for extractors, feat in zip(adapter.interactions, vit_features, strict=True):
        tokens = feat.flatten(2).transpose(1, 2)
        for ex in extractors:
            query = query + _deformable(ex.attn, _layer_norm(query, ex.query_norm), refs,
                                        _layer_norm(tokens, ex.feat_norm), tuple(feat.shape[-2:]))
            query = query + _conv_ffn(ex.ffn, _layer_norm(query, ex.ffn_norm), shapes)
    sizes = [h * w for h, w in shapes]
    c8, c16, c32 = [q.transpose(1, 2).reshape(q.shape[0], -1, *s) for q, s in zip(query.split(sizes, 1), shapes)]
    c4 = F.conv_transpose2d(c8, adapter.up.weight, adapter.up.bias, stride=2) + c4
    levels = [c + F.interpolate(f, size=c.shape[-2:], mode="bilinear", align_corners=False)
              for c, f in zip((c4, c8, c16, c32), vit_features, strict=True)]
    return [_bn(c, bn) for c, bn in zip(levels, adapter.norms, strict=True)]


def test_adapter_matches_functional_recomputation():
    dim = 32
    adapter = DinoAdapter(dim, num_taps=4, spm_channels=8, num_heads=4, num_points=2, value_ratio=0.5,
                          ffn_ratio=0.25, drop_path=0.3, extra_extractors=1, use_checkpoint=True).double().eval()
    _fill_(adapter, 2)
    g = torch.Generator().manual_seed(3)
    image = torch.randn(1, 3, 64, 96, generator=g, dtype=torch.float64)
    vit = [torch.randn(1, dim, 4, 6, generator=g, dtype=torch.float64) for _ in range(4)]
    ours = adapter(image, vit)
    ref = adapter_reference(adapter, image, vit)
    assert [tuple(o.shape) for o in ours] == [(1, dim, 16, 24), (1, dim, 8, 12), (1, dim, 4, 6), (1, dim, 2, 3)]
    for a, b in zip(ours, ref, strict=True):
        assert torch.allclose(a, b, atol=1e-9), (a - b).abs().max()
    # the ViT features matter: changing one tapped layer changes every level
    vit2 = [v.clone() for v in vit]
    vit2[1] += torch.randn(vit2[1].shape, generator=g, dtype=torch.float64)  # (a constant would be normalised away)
    assert all(not torch.allclose(a, b) for a, b in zip(ours, adapter(image, vit2), strict=True))
