"""Stage 4, infer + publish: batch embedding and exact / ANN top-k on Ray Data, atomic publishing."""
