"""What nnU-Net sees: trainers, plans, checkpoints, the plans' import allow-list, log routing and the environment
that lets nnU-Net find our trainers."""
