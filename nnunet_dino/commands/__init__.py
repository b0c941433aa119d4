"""The ``nnunet-dino`` command line and its sub-commands (demo, export, feature maps); each is a thin layer over
the library."""
