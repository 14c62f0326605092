"""The promotion gate: whether a new model replaces production, and what is published when not."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

from recsys_core.records import ModelSource


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    new_ndcg: float
    production_ndcg: float | None
    tolerance: float
    guard_passed: bool
    baseline: str | None = None  # the best baseline on the same holdout (None: no baseline evaluated)
    baseline_ndcg: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def guard_ok(guard: dict[str, Any] | None) -> tuple[bool, str]:
    """A missing guard record passes; an enforced guard that did not pass fails the gate."""
    if not guard:
        return True, "no generation-guard record"
    message = str(guard.get("message") or f"generation guard passed={guard.get('passed')}")
    if guard.get("blocks_promotion", bool(guard.get("enforced")) and not guard.get("passed")):
        return False, message
    if not guard.get("passed") and guard.get("applicable") is not False and "not enforced" not in message:
        message += " (not enforced)"
    return True, message


def best_baseline(baselines: dict[str, dict[str, Any]], metric: str = "ndcg@10") -> tuple[str, float] | None:
    """The baseline with the highest ``metric`` on the holdout (the first one named on ties), or None."""
    best: tuple[str, float] | None = None
    for name, m in baselines.items():
        if metric in m and (best is None or float(m[metric]) > best[1]):
            best = (name, float(m[metric]))
    return best


def gate_decision(new_ndcg: float, production_ndcg: float | None, tolerance: float,
                  guard: dict[str, Any] | None, production_note: str = "no production model yet",
                  baseline: tuple[str, float] | None = None) -> Decision:
    """Promote when the guard passes, new NDCG@10 beats the best baseline's (``baseline``: name and
    NDCG@10; strictly greater, the first promotion included) and new NDCG@10 >= production's -
    tolerance (all on today's holdout).

    ``production_ndcg`` None: nothing to compare against (first run, or the production model cannot
    score today's data, ``production_note`` says why); the guard and the baseline floor decide."""
    passed, guard_msg = guard_ok(guard)
    args = dict(new_ndcg=float(new_ndcg), production_ndcg=None if production_ndcg is None else float(production_ndcg),
                tolerance=float(tolerance), guard_passed=passed,
                baseline=None if baseline is None else baseline[0],
                baseline_ndcg=None if baseline is None else float(baseline[1]))
    if not passed:
        return Decision(False, f"rejected: {guard_msg}", **args)
    if baseline is not None and not new_ndcg > baseline[1]:
        return Decision(False, (f"rejected: holdout NDCG@10 {new_ndcg:.4f} does not beat the best baseline "
                                f"{baseline[0]} {baseline[1]:.4f}"), **args)
    beats = "" if baseline is None else f"; beats the best baseline {baseline[0]} {baseline[1]:.4f}"
    if production_ndcg is None:
        return Decision(True, f"promoted: {production_note}{beats}; {guard_msg}", **args)
    floor = production_ndcg - tolerance
    if new_ndcg < floor:
        return Decision(False, (f"rejected: holdout NDCG@10 {new_ndcg:.4f} < production {production_ndcg:.4f} - "
                                f"tolerance {tolerance:.4f} = {floor:.4f}"), **args)
    return Decision(True, (f"promoted: holdout NDCG@10 {new_ndcg:.4f} >= production {production_ndcg:.4f} - "
                           f"tolerance {tolerance:.4f}{beats}; {guard_msg}"), **args)


def _publish_production(prod_eval: ModelSource | None, base: str | None) -> tuple[ModelSource | None, str]:
    if prod_eval is not None:
        return prod_eval, f"recommendations from the production model {prod_eval.model_version}"
    if base is not None:
        return None, f"nothing published: the production model {base} cannot score today's data"
    return None, "nothing published: there is no production model to fall back to"


def _publish_nothing(prod_eval: ModelSource | None, base: str | None) -> tuple[ModelSource | None, str]:
    return None, "nothing published (registry.on_reject=none)"


# registry.on_reject: (production model's evaluation, its version) -> (what is published, why)
ON_REJECT: dict[str, Callable[[ModelSource | None, str | None], tuple[ModelSource | None, str]]] = {
    "production": _publish_production,
    "none": _publish_nothing,
}
