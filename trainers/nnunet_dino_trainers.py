# Re-export for nnU-Net's trainer lookup (nnUNet_extTrainer points at this folder). Absolute import only: the
# classes must live in the installed package so they pickle into nnU-Net's worker processes.
from nnunet_dino.nnunet.demo_trainers import *  # noqa: F401,F403
from nnunet_dino.nnunet.finetune_trainers import *  # noqa: F401,F403
from nnunet_dino.nnunet.trainers import *  # noqa: F401,F403
