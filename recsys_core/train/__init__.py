"""Stage 2, train: the objective, the epoch loop, the Ray Train driver and the generation guard."""
