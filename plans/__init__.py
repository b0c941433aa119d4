"""Drop-in plans presets (JSON), installed as nnunet_dino.presets."""
