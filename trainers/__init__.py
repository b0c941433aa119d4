"""The folder nnUNet_extTrainer points at: one re-export module, nothing else (see nnunet_dino.trainers)."""
