"""Drop-in plans recipes: JSON files of overrides, installed as nnunet_dino.plans_presets and read by
nnunet_dino/nnunet/plans.py."""
