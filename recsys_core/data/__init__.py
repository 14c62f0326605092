"""Stage 1, prepare: sources (parquet, MovieLens, synthetic), item text, validation and the split."""
