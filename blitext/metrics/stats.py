"""Paired comparisons of two systems on the same items: the exact two-sided sign test.

By hand with math.comb rather than scipy.stats.binomtest: scipy is not a dependency, and the
exact binomial tail is three lines."""
from __future__ import annotations

import math
from typing import Hashable, Mapping


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test (ties dropped): P(a split at least this uneven | no effect)."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = max(wins, losses)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k, n + 1)) / 2 ** n)


def paired_counts(a: Mapping[Hashable, bool], b: Mapping[Hashable, bool]) -> dict:
    """Items right in `a` but not `b` (wins), in `b` but not `a` (losses), and ties (both or neither),
    over the items both hold; with the sign test of wins against losses."""
    shared = a.keys() & b.keys()
    wins = sum(bool(a[k]) and not b[k] for k in shared)
    losses = sum(bool(b[k]) and not a[k] for k in shared)
    return {"items": len(shared), "wins": wins, "losses": losses, "ties": len(shared) - wins - losses,
            "sign_test_p": sign_test(wins, losses)}
