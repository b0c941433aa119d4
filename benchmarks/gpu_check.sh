#!/usr/bin/env bash
# GPU check for a session lent a GPU (H200; 15 minutes of device time in total; must finish in < 8 minutes).
#
# Carrying the packages the GPU image lacks (it has torch, timm, numpy, scipy, scikit-image, pandas, matplotlib,
# seaborn, tifffile, requests, einops, safetensors, pillow; not nnU-Net and its helpers):
#   once, here:  echo /.whl/ >> .git/info/exclude
#                python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#                  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#                  -d .whl nnunetv2==2.8.1 dynamic-network-architectures==0.4.4 batchgenerators==0.25.5 \
#                  batchgeneratorsv2==0.3.6 acvl-utils==0.2.6 SimpleITK nibabel blosc2 ndindex numexpr \
#                  connected-components-3d imagecodecs graphviz yacs future unittest2 traceback2 linecache2 \
#                  argparse nilearn
#                (an sdist-only package needs `pip wheel --no-deps -w .whl NAME` instead)
#   device run:  carry [".whl"], command: bash benchmarks/gpu_check.sh  (nnUNetv2_* scripts come from /tmp/site/bin)
# Local dry run (CPU, tiny sizes, same steps): bash benchmarks/gpu_check.sh --dry-run
# All figures go to $OUT/gpu_check.txt (or a temp folder when OUT is unset).
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0; [[ "${1:-}" == "--dry-run" ]] && DRY=1
OUT=${OUT:-$(mktemp -d)}; mkdir -p "$OUT"; LOG="$OUT/gpu_check.txt"; : > "$LOG"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}; [[ -x .venv/bin/python && $DRY == 1 ]] && PY=.venv/bin/python
if [[ -d .whl ]] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
BIN=$(dirname "$($PY -c 'import sys; print(sys.executable)')")
[[ -x /tmp/site/bin/nnUNetv2_train ]] && BIN=/tmp/site/bin
step() { local limit=$1; shift; echo "### $*" | tee -a "$LOG"; timeout "$limit" "$@" 2>&1 | tee -a "$LOG"; echo "(exit ${PIPESTATUS[0]})" | tee -a "$LOG"; }

step 30 $PY -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')"
step 120 $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_deformable_attention.py
if (( DRY )); then
  step 120 $PY benchmarks/network_speed.py --backbones dinov3_test_tiny dinov2_vits14 --size 64 --batch 1 --repeats 1
  step 300 $PY benchmarks/speed.py --backbones dinov3_test_tiny --repeats 1
else
  step 200 $PY benchmarks/speed.py --backbones dinov3_vits16 dinov3_vitb16 dinov3_vitl16 dinov2_vits14 dinov2_vitb14 \
    meddinov3_vitb16_ct3m --repeats 3
  step 120 $PY benchmarks/network_speed.py --backbones dinov3_vits16 dinov3_vit7b16 --batch 2 --repeats 3
  step 120 $PY benchmarks/finetune_cost.py --backbones dinov3_vits16 dinov3_vitb16 --size 512 --batch 2 --repeats 3
fi
(( DRY )) && step 300 $PY benchmarks/finetune_cost.py --backbones dinov3_test_tiny --size 64 --batch 1 --repeats 1
# a short real training through the stock CLI: demo dataset, ViT-S with a random Meta-format file
W=$(mktemp -d); ROOT=$(mktemp -d)
$PY -c "from nnunet_dino.testing.synthetic import write_meta_checkpoint; write_meta_checkpoint('dinov3_vits16', '$W')"
export nnUNet_raw=$ROOT/raw nnUNet_preprocessed=$ROOT/pre nnUNet_results=$ROOT/res nnUNet_dino_weights=$W
export nnUNet_extTrainer=$PWD/trainers nnUNet_n_proc_DA=8 nnUNet_def_n_proc=8
step 60 $PY -c "from pathlib import Path; from nnunet_dino.commands.demo import build_dataset; print(build_dataset(Path('$ROOT/raw')))"
step 120 "$BIN/nnUNetv2_plan_and_preprocess" -d 987 -c 2d -np 8 -npfp 8
if (( DRY )); then TR=nnUNetTrainerDinoUNet_smoke; DEV=cpu; else TR=nnUNetTrainerDinoUNet_S_smoke; DEV=cuda; fi
# CPU dry run: the smoke trainer's 8 epochs take 3-6 min on a busy 2-core machine; on the GPU 240 s is plenty
step $(( DRY ? 600 : 240 )) "$BIN/nnUNetv2_train" 987 2d 0 -tr $TR -device $DEV
# the LoRA and last-k trainers through the stock CLI (ViT-S layout on the GPU, tiny backbone on the CPU dry run)
if (( DRY )); then FT="nnUNetTrainerDinoUNet_LoRA_smoke nnUNetTrainerDinoUNet_LastK_smoke"; else
  FT="nnUNetTrainerDinoUNet_S_LoRA_smoke nnUNetTrainerDinoUNet_S_LastK_smoke"; fi
for T in $FT; do step $(( DRY ? 300 : 90 )) "$BIN/nnUNetv2_train" 987 2d 0 -tr $T -device $DEV; done
grep -h "Dino U-Net: \|Epoch time\|peak GPU memory\|Mean Validation Dice" "$ROOT"/res/*/*/fold_0/training_log_*.txt | tee -a "$LOG"
echo "figures in $LOG"
