"""What a tuning run leaves behind: every trial in a CSV, a printed summary, the best trial's
flags, and a plot of the metric against each parameter.

    results.csv               one row per trial: number, state, parameters, metrics, folder
    best_trial.json           the best finished trial: value, parameters, full trainer command
    accuracy_vs_params.png    one panel per parameter; finished trials as dots, pruned as crosses
"""
from __future__ import annotations

import csv
import io
import json
import os
import shlex
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # tuning runs on machines without a display
import matplotlib.pyplot as plt  # noqa: E402
import optuna  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from trainer.tuning.search_space import SearchSpace  # noqa: E402

RESULTS_CSV = "results.csv"
BEST_TRIAL_JSON = "best_trial.json"
PLOT_PNG = "accuracy_vs_params.png"
SUMMARY_ROWS = 10  # the best N trials are printed; the CSV has all


def _last_intermediate(trial: optuna.trial.FrozenTrial) -> float | None:
    if not trial.intermediate_values:
        return None
    return trial.intermediate_values[max(trial.intermediate_values)]


def trial_rows(study: optuna.Study, space: SearchSpace, key: str) -> list[dict]:
    """One dict per trial, in trial order; `key` is the tuned metric (e.g. val_accuracy)."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        row = {"trial": t.number, "state": t.state.name}
        row.update({p.name: t.params.get(p.name) for p in space.parameters})
        row[key] = t.value if t.state == TrialState.COMPLETE else None
        row["test_accuracy"] = t.user_attrs.get("metric_test_accuracy")
        row["last_epoch_" + key] = _last_intermediate(t)
        row["epochs_reported"] = len(t.intermediate_values)
        row["seconds"] = round(t.duration.total_seconds(), 1) if t.duration else None
        row["trial_dir"] = t.user_attrs.get("trial_dir")
        rows.append(row)
    return rows


def write_csv(rows: list[dict], path: Path) -> None:
    text = io.StringIO(newline="")
    if rows:
        writer = csv.DictWriter(text, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    replace_file(path, text.getvalue())


def replace_file(path: Path, text: str) -> None:
    """Writes a temp file, then renames it over `path`: a reader or a kill never leaves half a file."""
    temp = path.with_name(path.name + ".tmp")
    with open(temp, "w", newline="") as f:
        f.write(text)
    os.replace(temp, path)


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return None
    return study.best_trial


def describe_best(trial: optuna.trial.FrozenTrial, key: str) -> dict:
    command = trial.user_attrs.get("command", [])
    # The rerun command drops --job_dir so the user picks a fresh folder for the final model.
    flags = [f for f in command[2:] if not f.startswith("--job_dir=")]
    return {"trial": trial.number, key: trial.value, "test_accuracy": trial.user_attrs.get("metric_test_accuracy"),
            "params": trial.params, "trainer_flags": flags, "trial_dir": trial.user_attrs.get("trial_dir"),
            "command": shlex.join(["python", "-m", *command[1:2], *flags, "--job_dir=<new run folder>"])}


def format_summary(rows: list[dict], space: SearchSpace, key: str, best: dict | None) -> str:
    states = {}
    for r in rows:
        states[r["state"].lower()] = states.get(r["state"].lower(), 0) + 1
    lines = [f"{len(rows)} trials: " + ", ".join(f"{n} {s}" for s, n in sorted(states.items()))]
    done = sorted((r for r in rows if r[key] is not None), key=lambda r: r[key], reverse=space.goal == "maximize")
    names = [p.name for p in space.parameters]
    header = ["trial", key, "test_acc", *names]
    table = [header] + [[str(r["trial"]), f"{r[key]:.4f}",
                         "-" if r["test_accuracy"] is None else f"{r['test_accuracy']:.4f}",
                         *[_short(r[n]) for n in names]] for r in done[:SUMMARY_ROWS]]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines += ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in table]
    if best:
        lines.append(f"best: trial {best['trial']} {key}={best[key]:.4f}")
        lines.append(f"rerun it: {best['command']}")
    else:
        lines.append("no trial finished: see the train.log of each trial folder")
    return "\n".join(lines)


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def plot_metric_vs_params(rows: list[dict], space: SearchSpace, key: str, path: Path) -> None:
    """One panel per parameter: the final metric of finished trials, the last epoch's of pruned ones."""
    n = len(space.parameters)
    cols = min(n, 3)
    fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(4 * cols, 3.2 * ((n + cols - 1) // cols)),
                             squeeze=False)
    for ax, p in zip(axes.flat, space.parameters):
        categorical = p.type == "categorical"
        position = {v: i for i, v in enumerate(p.values)} if categorical else None
        for state, marker, color, label in (("COMPLETE", "o", "tab:blue", "finished"),
                                            ("PRUNED", "x", "tab:gray", "pruned (last epoch)")):
            pts = [(r[p.name], r[key] if state == "COMPLETE" else r["last_epoch_" + key])
                   for r in rows if r["state"] == state and r[p.name] is not None]
            pts = [(x, y) for x, y in pts if y is not None]
            if pts:
                xs = [position[x] if categorical else x for x, _ in pts]
                ax.scatter(xs, [y for _, y in pts], marker=marker, color=color, label=label)
        if categorical:
            ax.set_xticks(range(len(p.values)), [str(v) for v in p.values])
        if p.scale == "log":
            ax.set_xscale("log")
        ax.set_xlabel(p.name)
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize="small")
    fig.suptitle(f"{key} against each parameter ({len(rows)} trials)")
    fig.tight_layout()
    temp = path.with_name(path.name + ".tmp")
    fig.savefig(temp, format="png", dpi=80)
    plt.close(fig)
    os.replace(temp, path)


def write_results(study: optuna.Study, space: SearchSpace, job_dir: Path, key: str) -> dict | None:
    """Writes the CSV, best-trial JSON and plot into job_dir, prints the summary; returns the best."""
    rows = trial_rows(study, space, key)
    write_csv(rows, job_dir / RESULTS_CSV)
    trial = best_trial(study)
    best = describe_best(trial, key) if trial else None
    if best:
        replace_file(job_dir / BEST_TRIAL_JSON, json.dumps(best, indent=2) + "\n")
    plot_metric_vs_params(rows, space, key, job_dir / PLOT_PNG)
    print(format_summary(rows, space, key, best), flush=True)
    print(f"results: {job_dir / RESULTS_CSV}, {job_dir / PLOT_PNG}" +
          (f", {job_dir / BEST_TRIAL_JSON}" if best else ""), flush=True)
    return best
