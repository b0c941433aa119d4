"""TEST-ONLY helpers: Meta-format weight files with random values and synthetic nnU-Net datasets. Nothing here is
used by the commands a user runs; results obtained with it say nothing about accuracy."""
