#!/usr/bin/env bash
# The whole Dino U-Net flow with stock nnU-Net commands (what `nnunet-dino demo` does, step by step).
# Needs: pip install nnunet-dino; a dataset in nnU-Net raw format (here: the MNI152 demo dataset, ID 987).
set -euo pipefail
export nnUNet_raw=${nnUNet_raw:-$PWD/nnunet_dino_demo/raw}
export nnUNet_preprocessed=${nnUNet_preprocessed:-$PWD/nnunet_dino_demo/preprocessed}
export nnUNet_results=${nnUNet_results:-$PWD/nnunet_dino_demo/results}
eval "$(nnunet-dino env)"                      # nnUNet_extTrainer -> the installed trainer folder
python -c "from pathlib import Path; import os; from nnunet_dino.demo import build_dataset; build_dataset(Path(os.environ['nnUNet_raw']))"

# With Meta's weights (export nnUNet_dino_weights=/folder/with/dinov3_vits16_pretrain_lvd1689m-08c60483.pth)
# use -tr nnUNetTrainerDinoUNet; without them this runs the CPU smoke trainer (tiny random backbone).
TRAINER=${TRAINER:-nnUNetTrainerDinoUNet_smoke}
DEVICE=${DEVICE:-cpu}

nnUNetv2_plan_and_preprocess -d 987 -c 2d
nnUNetv2_train 987 2d 0 -tr "$TRAINER" -device "$DEVICE" --npz
nnUNetv2_train 987 2d 1 -tr "$TRAINER" -device "$DEVICE" --npz
nnUNetv2_find_best_configuration 987 -c 2d -tr "$TRAINER" -f 0 1
nnUNetv2_predict -i "$nnUNet_raw/Dataset987_MNI152Demo/imagesTs" -o pred_987 -d 987 -c 2d -tr "$TRAINER" \
  -f 0 1 -device "$DEVICE"
# no backbone inside: about 12 MB per fold of the smoke model (2 folds measured 25 MB), ~25 MB per fold for ViT-S
nnUNetv2_export_model_to_zip -d 987 -o dinounet_987.zip -c 2d -tr "$TRAINER" -f 0 1
