"""nnunet-dino benchmark: per-case metrics, paired statistics, the report and its plots."""
