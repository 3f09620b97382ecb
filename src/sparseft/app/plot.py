"""``sparseft plot results.jsonl --out dir``: score vs trainable parameters (one line per
method, min-max band over seeds) and step time / peak memory bars, as PNG; plus
``summary.md``, the same numbers as a table.

Where a (method, budget) was run at several learning rates, the rate with the best mean
validation score is used (test scores are never used to choose), and the table says which.
Runs at the default rate (``lr_given`` "auto" in metrics.json) form their own series,
"<method> (default lr)", so default and tuned runs show side by side. ``summary.md`` also
pairs every series with LoRA at the same budget, seed by seed, and lists every rate tried
per budget (mean over seeds), with the default marked and in bold the method's best on
validation over all its rates, the default among them.
"""
from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from .data import DataError


def read_results(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"results file not found: {path}")
    rows = []
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}, line {line_no}: not valid JSON ({err.msg})") from None
        missing = [k for k in ("method", "score", "trainable_params") if k not in row]
        if missing:
            raise DataError(f"{path}, line {line_no}: missing field(s) {missing}")
        rows.append(row)
    # a run recorded twice (e.g. two sweeps over one folder) counts once: keep the last
    by_run = {row.get("run", i): row for i, row in enumerate(rows)}
    rows = list(by_run.values())
    if not rows:
        raise DataError(f"{path} has no results")
    return rows


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (task, method, budget) at its best learning rate by mean validation score."""
    groups: dict[tuple, dict[Any, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        groups[(row.get("task"), series(row), row.get("budget", ""))][row.get("lr")].append(row)
    out = []
    for (task, method, budget), by_lr in groups.items():
        lr = best_rate({rate: {r.get("seed"): r for r in runs} for rate, runs in by_lr.items()})
        runs = by_lr[lr]
        higher = runs[0].get("higher_is_better", True)
        scores = [r["score"] for r in runs]
        out.append({
            "task": task, "method": method, "budget": budget, "lr": lr, "lrs_tried": sorted(x for x in by_lr if x is not None),
            "seeds": len(runs), "trainable_params": statistics.fmean(r["trainable_params"] for r in runs),
            "score_mean": statistics.fmean(scores), "score_min": min(scores), "score_max": max(scores),
            "validation_mean": statistics.fmean(r.get("validation_score", math.nan) for r in runs),
            "step_time_s": statistics.median(r.get("step_time_s", math.nan) for r in runs),
            "peak_rss_mb": _peak_rss(runs),
            "metric": runs[0].get("metric", "score"), "higher_is_better": higher,
            "majority_rate": _mean_or_none(r.get("majority_rate") for r in runs),
            "macro_f1_mean": _mean_or_none((r.get("test") or {}).get("macro_f1") for r in runs),
            "scores_by_seed": {r.get("seed"): r["score"] for r in runs},
        })
    return sorted(out, key=lambda e: (str(e["task"]), e["method"], e["trainable_params"]))


def best_rate(by_rate: dict[Any, dict[Any, dict[str, Any]]]) -> Any:
    """The rate with the best mean validation score, {rate: {seed: row}} -> rate.

    Rates are compared on the seeds every one of them ran (the sweep's seeds), so a rate
    that also ran more seeds later is not judged on a different sample; without a seed in
    common, on all of each rate's seeds."""
    common = set.intersection(*(set(runs) for runs in by_rate.values()))
    higher = next(iter(next(iter(by_rate.values())).values())).get("higher_is_better", True)

    def mean_validation(rate):
        runs = by_rate[rate]
        rows = [runs[s] for s in common] if common else list(runs.values())
        mean = statistics.fmean(r.get("validation_score", r["score"]) for r in rows)
        return mean if higher else -mean
    return max(by_rate, key=mean_validation)


def series(row: dict[str, Any]) -> str:
    """The method, with the grid variant the run belongs to (if any), marked when the run
    took the default rate rather than a given one."""
    return _method_and_variant(row) + (" (default lr)" if row.get("lr_given") == "auto" else "")


def _method_and_variant(row: dict[str, Any]) -> str:
    return row["method"] + (f" [{row['variant']}]" if row.get("variant") else "")


def paired_vs_lora(summary: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each non-LoRA series against LoRA at the same task and budget, on the seeds both ran."""
    lora = {(e["task"], e["budget"]): e for e in summary if e["method"] == "lora"}
    out = []
    for e in summary:
        ref = lora.get((e["task"], e["budget"]))
        if e["method"] == "lora" or ref is None:
            continue
        seeds = sorted(set(e["scores_by_seed"]) & set(ref["scores_by_seed"]), key=str)
        if not seeds:
            continue
        sign = 1 if e["higher_is_better"] else -1
        diffs = [e["scores_by_seed"][s] - ref["scores_by_seed"][s] for s in seeds]
        out.append({"task": e["task"], "method": e["method"], "budget": e["budget"], "lr": e["lr"], "lora_lr": ref["lr"],
                    "seeds": len(seeds), "diff_mean": statistics.fmean(diffs), "diff_min": min(diffs),
                    "diff_max": max(diffs), "wins": sum(sign * d > 0 for d in diffs)})
    return out


def runs_by_rate(rows: list[dict[str, Any]]) -> dict[tuple, dict[Any, dict[Any, dict]]]:
    """{(task, method with variant, budget): {rate: {seed: row}}}, the default rate's runs
    in with the given ones: what ``best_rate`` chooses among for each method."""
    out: dict[tuple, dict[Any, dict[Any, dict]]] = defaultdict(lambda: defaultdict(dict))
    for row in rows:
        out[_method_key(row)][row.get("lr")][row.get("seed")] = row
    return out


def _method_key(row: dict[str, Any]) -> tuple:
    return row.get("task"), _method_and_variant(row), row.get("budget", "")


def default_vs_tuned(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each method's runs at the default rate against its best rate, per task and budget.

    The best rate is chosen on mean validation score over every rate the method ran at,
    the default rate's own runs included (so it can be the best); the two are compared
    on test score, paired by seed."""
    by_group = runs_by_rate(rows)
    defaults: dict[tuple, dict[Any, dict]] = defaultdict(dict)
    for row in rows:
        if row.get("lr_given") == "auto":
            defaults[_method_key(row)][row.get("seed")] = row
    out = []
    for key, default_runs in defaults.items():
        by_lr = by_group[key]
        best = best_rate(by_lr)
        default_lr = next(iter(default_runs.values()))["lr"]
        seeds = sorted(set(default_runs) & set(by_lr[best]), key=str)
        if not seeds:
            continue
        diffs = [default_runs[s]["score"] - by_lr[best][s]["score"] for s in seeds]
        out.append({"task": key[0], "method": key[1], "budget": key[2], "default_lr": default_lr, "best_lr": best,
                    "lrs_tried": sorted(by_lr), "seeds": len(seeds),
                    "default_mean": statistics.fmean(default_runs[s]["score"] for s in seeds),
                    "best_mean": statistics.fmean(by_lr[best][s]["score"] for s in seeds),
                    "diff_mean": statistics.fmean(diffs), "diff_min": min(diffs), "diff_max": max(diffs)})
    return sorted(out, key=lambda e: (str(e["task"]), e["method"], _budget_order(e["budget"])))


def _budget_order(budget: str) -> tuple:
    number = "".join(c for c in str(budget) if c.isdigit() or c == ".")
    return str(budget)[:1], float(number) if number else 0.0


def _peak_rss(runs: list[dict[str, Any]]) -> float:
    """Median peak RSS of training (selection + training, not the final evaluation) over the
    runs that recorded it; runs from before that field existed give the whole run's peak."""
    training = [r["train_peak_rss_mb"] for r in runs if r.get("train_peak_rss_mb")]
    return statistics.median(training or [r.get("peak_rss_mb", math.nan) for r in runs])


def _mean_or_none(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise DataError("plotting needs matplotlib: pip install 'sparseft[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_results(results: str | Path, out: str | Path, grid: str | Path | None = None) -> list[Path]:
    """Write the PNGs and summary.md; with ``grid``, only that grid file's runs count."""
    plt = _pyplot()
    rows = read_results(results)
    if grid is not None:
        from .sweep import expand, load_grid

        names = {run.name for run in expand(load_grid(grid))}
        rows = [row for row in rows if row.get("run") in names]
        if not rows:
            raise DataError(f"{results} holds none of the runs of {grid}")
    summary = summarize(rows)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for task in sorted({str(e["task"]) for e in summary}):
        entries = [e for e in summary if str(e["task"]) == task]
        # (1) score vs trainable parameters
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        for method in sorted({e["method"] for e in entries}):
            pts = sorted((e for e in entries if e["method"] == method), key=lambda e: e["trainable_params"])
            x = [max(e["trainable_params"], 1) for e in pts]
            line, = ax.plot(x, [e["score_mean"] for e in pts], marker="o", label=method)
            ax.fill_between(x, [e["score_min"] for e in pts], [e["score_max"] for e in pts], alpha=0.2,
                            color=line.get_color())
        majority = entries[0].get("majority_rate")
        if majority is not None:
            ax.axhline(majority, color="grey", linestyle="--", linewidth=1, label="majority answer (mean)")
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (excluding the task head)")
        metric = entries[0]["metric"]
        ax.set_ylabel(f"test {metric}" + ("" if entries[0]["higher_is_better"] else " (lower is better)"))
        ax.set_title(f"{task}: mean over seeds, band = min-max")
        ax.legend()
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        path = out / f"{task}-score-vs-params.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
        # (2) step time and peak memory
        labels = [f"{e['method']}\n{e['budget']}" for e in entries]
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(max(6.4, 0.7 * len(entries) + 2), 4.0))
        a1.bar(range(len(entries)), [e["step_time_s"] * 1000 for e in entries], color="tab:blue")
        a1.set_ylabel("median step time (ms)")
        a2.bar(range(len(entries)), [e["peak_rss_mb"] for e in entries], color="tab:orange")
        a2.set_ylabel("peak RSS, training (MB)")
        for ax in (a1, a2):
            ax.set_xticks(range(len(entries)))
            ax.set_xticklabels(labels, fontsize=7)
        fig.suptitle(f"{task}: cost per run (median over seeds)")
        fig.tight_layout()
        path = out / f"{task}-cost.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    table = out / "summary.md"
    table.write_text(summary_table(summary) + paired_table(paired_vs_lora(summary))
                     + default_table(default_vs_tuned(rows)) + rate_table(rows))
    written.append(table)
    return written


def summary_table(summary: list[dict[str, Any]]) -> str:
    f1 = any(e.get("macro_f1_mean") is not None for e in summary)  # classification tasks report it
    lines = ["| task | method | budget | trainable params | lr (best on validation) | seeds | test score mean [min, max] "
             + ("| test macro-F1 mean " if f1 else "")
             + "| validation mean | majority | step ms | training peak RSS MB |", "|" + "---|" * (12 if f1 else 11)]
    for e in summary:
        f1_cell = "" if not f1 else f"| {'-' if e.get('macro_f1_mean') is None else format(e['macro_f1_mean'], '.4f')} "
        lines.append(
            f"| {e['task']} | {e['method']} | {e['budget']} | {e['trainable_params']:,.0f} | {e['lr']:g} "
            f"(of {', '.join(f'{x:g}' for x in e['lrs_tried'])}) | {e['seeds']} | {e['score_mean']:.4f} "
            f"[{e['score_min']:.4f}, {e['score_max']:.4f}] {f1_cell}| {e['validation_mean']:.4f} | "
            f"{'-' if e['majority_rate'] is None else format(e['majority_rate'], '.4f')} | {e['step_time_s'] * 1000:.0f} "
            f"| {e['peak_rss_mb']:.0f} |")
    return "\n".join(lines) + "\n"


def paired_table(paired: list[dict[str, Any]]) -> str:
    if not paired:
        return ""
    lines = ["", "Paired by seed against LoRA at the same budget (method minus LoRA, test score):", "",
             "| task | method | budget | lr | LoRA lr | seeds | mean [min, max] of (method - LoRA) | better than LoRA |",
             "|---|---|---|---|---|---|---|---|"]
    for p in paired:
        lines.append(f"| {p['task']} | {p['method']} | {p['budget']} | {p['lr']:g} | {p['lora_lr']:g} | {p['seeds']} | "
                     f"{p['diff_mean']:+.4f} [{p['diff_min']:+.4f}, {p['diff_max']:+.4f}] | {p['wins']}/{p['seeds']} |")
    return "\n".join(lines) + "\n"


def default_table(compared: list[dict[str, Any]]) -> str:
    if not compared:
        return ""
    lines = ["", "The default rate against each method's best rate (chosen on validation, the default among the "
             "rates tried), paired by seed (test score):", "",
             "| task | method | budget | default lr | best lr (of rates tried) | seeds | default mean | best mean "
             "| mean [min, max] of (default - best) |", "|---|---|---|---|---|---|---|---|---|"]
    for e in compared:
        tried = ", ".join(f"{x:g}" for x in e["lrs_tried"])
        lines.append(f"| {e['task']} | {e['method']} | {e['budget']} | {e['default_lr']:.3g} | {e['best_lr']:.3g} "
                     f"(of {tried}) | {e['seeds']} | {e['default_mean']:.4f} | {e['best_mean']:.4f} | "
                     f"{e['diff_mean']:+.4f} [{e['diff_min']:+.4f}, {e['diff_max']:+.4f}] |")
    return "\n".join(lines) + "\n"


def rate_table(rows: list[dict[str, Any]]) -> str:
    """Every (task, budget, method, rate): validation and test score, mean over its seeds.

    The bold rate is the method's best on validation over every rate it ran at, the
    default rate's runs included, as in the default-against-best table."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[(_method_key(row), row.get("lr"), row.get("lr_given") == "auto")].append(row)
    chosen = {key: best_rate(by_lr) for key, by_lr in runs_by_rate(rows).items()}
    lines = ["", "Every rate tried (mean over seeds; bold: chosen on validation over the seeds every rate ran, "
             "the default rate among them):", "",
             "| task | budget | method | lr | seeds | validation | test |", "|---|---|---|---|---|---|---|"]

    def order(key):
        (task, name, budget), lr, _ = key
        return str(task), *_budget_order(str(budget)), name, lr if lr is not None else 0.0
    for key in sorted(groups, key=order):
        method, lr, default = key
        task, name, budget = method
        runs = groups[key]
        cell = "-" if lr is None else f"{lr:g}"
        if chosen[method] == lr:
            cell = f"**{cell}**"
        if default:
            cell += " (default)"
        val = statistics.fmean(r.get("validation_score", math.nan) for r in runs)
        test = statistics.fmean(r["score"] for r in runs)
        lines.append(f"| {task} | {budget} | {name} | {cell} | {len(runs)} | {val:.4f} | {test:.4f} |")
    return "\n".join(lines) + "\n"
