"""Drop-in plans presets: JSON files of overrides, installed as nnunet_dino.plans_presets and read by nnunet_dino/nnunet/plans.py."""
