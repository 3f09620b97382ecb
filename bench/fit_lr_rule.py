"""Fit the default-rate rule (src/sparseft/lr_rule.py) to learning-rate sweeps.

For each method and budget in a results.jsonl, the rate with the best validation score
is taken (test scores are not used), then log(lr) = log(LR_AT_REF) - EXPONENT * log(density
/ REF_DENSITY) is fitted by least squares over the budgets. Prints the table and the fit.

    python bench/fit_lr_rule.py docs/results/rt-sentiment-lr/results.jsonl --methods random gradient
"""
from __future__ import annotations

import argparse
import math
import statistics
from collections import defaultdict

from sparseft.app.plot import read_results
from sparseft.lr_rule import REF_DENSITY


def best_rates(rows, methods):
    """{method: [(density, best lr, its validation score, lrs tried)]}, by budget."""
    by = defaultdict(lambda: defaultdict(list))
    for row in rows:
        if row["method"] in methods and row.get("lr_given") != "auto":
            by[(row["method"], row["density"])][row["lr"]].append(row["validation_score"])
    out = defaultdict(list)
    for (method, density), by_lr in sorted(by.items()):
        lr, scores = max(by_lr.items(), key=lambda kv: statistics.fmean(kv[1]))
        out[method].append((density, lr, statistics.fmean(scores), sorted(by_lr)))
    return out


def fit(points):
    """Least squares of log lr on log(density / REF_DENSITY): (lr at REF_DENSITY, exponent)."""
    xs = [math.log(d / REF_DENSITY) for d, *_ in points]
    ys = [math.log(lr) for _, lr, *_ in points]
    if len(points) < 2:
        return math.exp(ys[0]), None
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return math.exp(my - slope * mx), -slope


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results")
    parser.add_argument("--methods", nargs="+", default=["random", "gradient"])
    args = parser.parse_args()
    for method, points in best_rates(read_results(args.results), args.methods).items():
        print(f"{method}:")
        for density, lr, val, tried in points:
            edge = " (at an end of the range)" if lr in (tried[0], tried[-1]) else ""
            print(f"  density {density:.5f}: best lr {lr:g} (validation {val:.4f}; tried {', '.join(f'{x:g}' for x in tried)}){edge}")
        at_ref, exponent = fit(points)
        print(f"  fit: lr at REF_DENSITY {at_ref:.4g}" + ("" if exponent is None else f", exponent {exponent:.3f}"))


if __name__ == "__main__":
    main()
