"""The two-tower model: LM towers, losses, pretrained loaders and checkpoint folders."""
