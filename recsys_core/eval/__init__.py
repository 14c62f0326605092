"""Stage 3, evaluate: metrics, the holdout evaluator and reference baselines."""
