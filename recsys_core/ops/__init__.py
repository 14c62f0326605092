"""Operations around a run: model registry, promotion gate, report, explanations."""
