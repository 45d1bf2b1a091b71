"""The Pareto frontier of (cost, accuracy) points: lower cost and higher accuracy are better."""

from __future__ import annotations

from collections.abc import Sequence


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point dominates, in order of increasing cost.

    Point q dominates p when q costs no more and scores no less, and is strictly better in one of the
    two. Duplicates of a frontier point are all on the frontier (neither dominates the other).
    """
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front: list[int] = []
    best = float("-inf")
    best_cost = None
    for i in order:
        cost, score = points[i]
        if score > best:
            front.append(i)
            best, best_cost = score, cost
        elif score == best and cost == best_cost:
            front.append(i)
    return front
