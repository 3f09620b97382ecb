"""Fit the default-rate rule (src/sparseft/lr_rule.py) to learning-rate sweeps.

For each task, method and budget in the results.jsonl files, the rate with the best
validation score is taken (test scores are not used; seeds are averaged unless --seed
picks one; rates that tie count as their geometric mean), then log(lr) =
log(LR_AT_REF) - EXPONENT * log(density / REF_DENSITY) is fitted by least squares over the
budgets and tasks; --size also fits the exponent of the number of targeted weights above the
reference model's, log(lr) = ... - SIZE_EXPONENT * log(max(1, targeted / REF_TARGETED)).
--pool fits all the given methods as one family. Prints the table and the fit.

    python bench/fit_lr_rule.py docs/results/rt-sentiment-lr/results.jsonl --methods random gradient
    python bench/fit_lr_rule.py docs/results/bbc-topic-heldout/results.jsonl \
        docs/results/rtgen-long/results.jsonl --methods random grow-drop --pool
    python bench/fit_lr_rule.py docs/results/rt-sentiment-lr/results.jsonl \
        docs/results/bbc-topic-heldout/results.jsonl docs/results/bbc-dynamic/results.jsonl \
        docs/results/bbclm-heldout/results.jsonl --methods gradient id3 dst --pool --seed 0
    python bench/fit_lr_rule.py docs/results/rt-sentiment-lr/results.jsonl \
        docs/results/bbc-topic-heldout/results.jsonl docs/results/bbc-dynamic/results.jsonl \
        docs/results/bbclm-heldout/results.jsonl docs/results/rtgen-heldout/results.jsonl \
        --methods gradient id3 dst --pool --seed 0 --size
"""
from __future__ import annotations

import argparse
import math
import statistics
from collections import defaultdict

import numpy as np

from sparseft.app.plot import read_results
from sparseft.lr_rule import REF_DENSITY, REF_TARGETED


def best_rates(rows, methods, seed=None):
    """{method: [(task, density, best lr, its validation score, lrs tried, targeted weights)]}, by task and budget."""
    by = defaultdict(lambda: defaultdict(dict))
    for row in rows:
        if row["method"] in methods and (seed is None or row["seed"] == seed):
            # the same run may be listed in two files: count it once
            key = (row["method"], row["task"], row["density"], row["targeted_weights"],
                   row.get("higher_is_better", True))
            by[key][round(row["lr"], 12)][(row["seed"], row["run"])] = row
    out = defaultdict(list)
    for (method, task, density, targeted, higher_is_better), by_lr in sorted(by.items()):
        sign = 1 if higher_is_better else -1
        score = {lr: statistics.fmean(r["validation_score"] for r in runs.values()) for lr, runs in by_lr.items()}
        best = max(sign * s for s in score.values())
        tied = [lr for lr, s in score.items() if sign * s == best]
        lr = math.exp(statistics.fmean(math.log(x) for x in tied))
        out[method].append((task, density, lr, sign * best, sorted(by_lr), targeted))
    return out


def fit(points, size=False):
    """Least squares of log lr on log(density / REF_DENSITY), and with ``size`` on
    log(max(1, targeted / REF_TARGETED)): (lr at REF_DENSITY, exponent, size exponent)."""
    ys = np.log([p[2] for p in points])
    if len(points) < 2:
        return math.exp(ys[0]), None, None
    columns = [np.ones(len(points)), np.log([p[1] / REF_DENSITY for p in points])]
    if size:
        columns.append(np.log([max(1.0, p[5] / REF_TARGETED) for p in points]))
    coef = np.linalg.lstsq(np.stack(columns, axis=1), ys, rcond=None)[0]
    return math.exp(coef[0]), -coef[1], (-coef[2] if size else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+")
    parser.add_argument("--methods", nargs="+", default=["random", "gradient"])
    parser.add_argument("--pool", action="store_true", help="fit the given methods together, as one family")
    parser.add_argument("--seed", type=int, help="use only this seed's runs")
    parser.add_argument("--size", action="store_true", help="also fit the exponent of the targeted weights")
    args = parser.parse_args()
    rows = [row for path in args.results for row in read_results(path)]
    by_method = best_rates(rows, args.methods, args.seed)
    groups = {" + ".join(by_method): [p for points in by_method.values() for p in points]} if args.pool else by_method
    for name, points in groups.items():
        print(f"{name}:")
        for task, density, lr, val, tried, _ in points:
            edge = " (at an end of the range)" if any(math.isclose(lr, t) for t in (tried[0], tried[-1])) else ""
            print(f"  {task} density {density:.5f}: best lr {lr:g} (validation {val:.4f}; "
                  f"tried {', '.join(f'{x:g}' for x in tried)}){edge}")
        at_ref, exponent, size_exponent = fit(points, args.size)
        print(f"  fit: lr at REF_DENSITY {at_ref:.4g}" + ("" if exponent is None else f", exponent {exponent:.3f}")
              + ("" if size_exponent is None else f", size exponent {size_exponent:.3f}"))


if __name__ == "__main__":
    main()
