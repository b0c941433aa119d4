"""The folder nnUNet_extTrainer names (installed as nnunet_dino.ext_trainers): one re-export of our trainers
(nnunet_dino/nnunet/*trainers.py)."""
