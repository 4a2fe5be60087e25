"""`vilbert compare`: an ablation's results, read back from the tracking store, as the paper's
tables (Markdown and CSV) and plots (PNG).

Each fine-tune's figure is the metric that picked its best checkpoint (`val/best_<the task's
val_metric>`); each pretraining's is its held-out alignment accuracy. Seeds are averaged
(mean ± population spread, and how many). A job that failed, is still running or never ran
shows as such, never as a number. The tables:

- every configuration (a cell without its seed) against every task;
- for each key the ablation varies, the tasks against that key's values with every other
  key held at the reference cell's value (e.g. the metric vs co-attention depth, vs the
  pretraining data fraction, where 0 is no pretraining);
- the paper's Table 1 when `model.arch` and `data.fraction` both vary: each architecture
  with and without pretraining.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from statistics import mean, pstdev

from vilbert.ablation.jobs import PRETRAIN, deciding_metric
from vilbert.ablation.parent import CELLS_ARTIFACT, ROLE_TAG
from vilbert.ablation.spec import NO_PRETRAINING, SEED, Cell

FINISHED, FAILED, RUNNING, MISSING, BLOCKED = "finished", "failed", "running", "missing", "not run"
PRESET = "model.preset"  # the co-attention depth axis, by preset


@dataclass
class Outcome:
    cell: Cell
    stage: str  # PRETRAIN or a task
    status: str
    value: float | None = None


def find_parent(client, experiment_id: str, parent_run_id: str | None):
    if parent_run_id:
        return client.get_run(parent_run_id)
    parents = client.search_runs([experiment_id], f"tags.`{ROLE_TAG[0]}` = '{ROLE_TAG[1]}'",
                                 order_by=["attributes.start_time DESC"], max_results=1)
    if not parents:
        raise ValueError("the experiment holds no ablation (no run tagged ablation.role=parent): run `vilbert "
                         "ablate FILE` first, or pass --parent RUN_ID")
    return parents[0]


def read_outcomes(uri: str, experiment: str, parent_run_id: str | None = None) -> tuple[dict, list[Outcome], str]:
    """(the ablation's cells record, an Outcome per cell and stage, the parent run's id)."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one small file: no progress bar
    import mlflow

    client = mlflow.MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise ValueError(f"no experiment {experiment!r} in {uri}")
    parent = find_parent(client, found.experiment_id, parent_run_id)
    record = json.loads(Path(mlflow.artifacts.download_artifacts(
        run_id=parent.info.run_id, artifact_path=CELLS_ARTIFACT, tracking_uri=uri)).read_text())
    children = client.search_runs([found.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
                                  order_by=["attributes.start_time ASC"], max_results=50_000)
    runs = {(r.data.tags.get("ablation.cell"), r.data.tags.get("ablation.stage")): r for r in children}  # newest wins
    failed = set(parent.data.tags.get("ablation.failed_jobs", "").split(", "))
    outcomes = []
    for values in record["cells"]:
        cell = Cell(values)
        stages = ([PRETRAIN] if cell.pretrained else []) + record["tasks"]
        for stage in stages:
            run = runs.get((cell.name, stage))
            metric = deciding_metric(stage)
            if run is not None and run.info.status == "FINISHED" and metric in run.data.metrics:
                outcomes.append(Outcome(cell, stage, FINISHED, run.data.metrics[metric]))
            elif (run is not None and run.info.status in ("FAILED", "KILLED")) or f"{cell.name}/{stage}" in failed:
                pretraining_failed = stage != PRETRAIN and run is None and cell.pretrained \
                    and f"{cell.name}/{PRETRAIN}" in failed
                outcomes.append(Outcome(cell, stage, BLOCKED if pretraining_failed else FAILED))
            else:
                outcomes.append(Outcome(cell, stage, RUNNING if run is not None else MISSING))
    return record, outcomes, parent.info.run_id


def configuration(cell: Cell) -> tuple:
    return cell.without(SEED)


def summary(outcomes: list[Outcome]) -> str:
    """`0.682 ± 0.015 (3)`; what did not finish is named, never counted as a zero; `-` where
    there is nothing to run (the pretraining of a cell without pretraining)."""
    values = [o.value for o in outcomes if o.status == FINISHED]
    others = [o.status for o in outcomes if o.status != FINISHED]
    text = ""
    if values:
        text = f"{mean(values):.3f} ± {pstdev(values):.3f} ({len(values)})" if len(values) > 1 else f"{values[0]:.3f}"
    if others:
        counted = ", ".join(f"{others.count(s)} {s}" for s in dict.fromkeys(others))
        text = f"{text} ({counted})" if text else counted
    return text or "-"


def _shown(value) -> str:
    """A cell value as the tables show it (`-`: the cell does not set the key)."""
    return "-" if value is None else value if isinstance(value, str) else json.dumps(value)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _stages(record: dict, outcomes: list[Outcome]) -> list[str]:
    return ([PRETRAIN] if any(o.stage == PRETRAIN for o in outcomes) else []) + record["tasks"]


def _column(stage: str) -> str:
    if stage == PRETRAIN:
        return "pretraining: held-out alignment"
    return f"{stage}: {deciding_metric(stage).split('/')[-1]}"


def _group(outcomes: list[Outcome], stage: str, keep) -> list[Outcome]:
    return [o for o in outcomes if o.stage == stage and keep(o.cell)]


def along(record: dict, key: str, value: str):
    """The cells whose `key` shows as `value` and that equal the reference on every other
    varied key (seed aside)."""
    others = [k for k in record["varied"] if k != key]
    return lambda cell: _shown(cell.values.get(key)) == value and all(
        cell.values.get(k) == record["reference"].get(k) for k in others)


def co_attention_layers(preset: str) -> int | None:
    """How many co-attention layers a `model.preset` has (None: not a preset that says)."""
    from vilbert.config import PRESETS

    return len(PRESETS[preset]["v_biattention_id"]) if "v_biattention_id" in PRESETS.get(preset, {}) else None


def key_values(record: dict, key: str) -> list[str]:
    """`key`'s values as the tables show them, in the file's order; presets by their number
    of co-attention layers (the paper's depth axis)."""
    values = list(dict.fromkeys(_shown(Cell(v).values.get(key)) for v in record["cells"]))
    if key == PRESET and all(co_attention_layers(v) is not None for v in values):
        values.sort(key=co_attention_layers)
    return values


def value_label(key: str, value: str) -> str:
    """A value as a row or an axis names it: a preset with its co-attention depth."""
    depth = co_attention_layers(value) if key == PRESET else None
    return value if depth is None else f"{value} ({depth} co-attention)"


def tables(record: dict, outcomes: list[Outcome]) -> str:
    stages = _stages(record, outcomes)
    varied = record["varied"]
    configurations = {configuration(o.cell): o.cell for o in reversed(outcomes)}  # -> a cell of it
    sections = [f"# Ablation {record['name']}", "", "## Every configuration (seeds averaged)", ""]
    rows = []
    for config, cell in reversed(configurations.items()):
        rows.append([_shown(cell.values.get(k)) for k in varied] + [summary(_group(
            outcomes, stage, lambda other, c=config: configuration(other) == c)) for stage in stages])
    sections.append(_table(varied + [_column(s) for s in stages], rows))
    if "model.arch" in varied and NO_PRETRAINING[0] in varied:
        sections += ["", "## Table 1: architecture x pretraining", ""]
        reference_fraction = record["reference"].get(NO_PRETRAINING[0], 1)  # pretrained, unless none is
        others = [k for k in varied if k not in ("model.arch", NO_PRETRAINING[0])]
        rows = []
        for arch in dict.fromkeys(Cell(v).values.get("model.arch") for v in record["cells"]):
            for label, fraction in (("no", NO_PRETRAINING[1]), ("yes", reference_fraction)):
                def keep(cell, arch=arch, fraction=fraction):
                    return cell.values.get("model.arch") == arch and cell.values.get(NO_PRETRAINING[0], 1) == \
                        fraction and all(cell.values.get(k) == record["reference"].get(k) for k in others)
                rows.append([str(arch), label] + [summary(_group(outcomes, t, keep)) for t in record["tasks"]])
        sections.append(_table(["model.arch", "pretrained"] + [_column(t) for t in record["tasks"]], rows))
    for key in varied:
        held = ", ".join(f"{k}={_shown(record['reference'].get(k))}" for k in varied if k != key)
        sections += ["", f"## vs {key}" + (f" ({held})" if held else ""), ""]
        rows = [[value_label(key, value)] + [summary(_group(outcomes, stage, along(record, key, value)))
                                       for stage in stages] for value in key_values(record, key)]
        sections.append(_table([key] + [_column(s) for s in stages], rows))
    return "\n".join(sections) + "\n"


def csv_text(record: dict, outcomes: list[Outcome]) -> str:
    keys = list(dict.fromkeys(k for v in record["cells"] for k in v))
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow([*keys, "stage", "metric", "status", "value"])
    for o in outcomes:
        metric = deciding_metric(o.stage)
        writer.writerow([*[_shown(o.cell.values.get(k, "")) for k in keys], o.stage, metric, o.status,
                         "" if o.value is None else f"{o.value:.6f}"])
    return out.getvalue()


def plot(record: dict, outcomes: list[Outcome], key: str, path: Path) -> None:
    """Each task's metric (mean, and the seeds' spread as error bars) against `key`'s values,
    the other keys at the reference; points without a finished run are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = key_values(record, key)
    figure, axes = plt.subplots(figsize=(5, 3.5), dpi=100)
    for stage in _stages(record, outcomes):
        xs, means, spreads = [], [], []
        for x, value in enumerate(values):
            got = [o.value for o in _group(outcomes, stage, along(record, key, value)) if o.status == FINISHED]
            if got:
                xs.append(x), means.append(mean(got)), spreads.append(pstdev(got))
        if xs:
            axes.errorbar(xs, means, yerr=spreads, marker="o", capsize=3, label=_column(stage))
    axes.set_xticks(range(len(values)), [value_label(key, v).replace(" (", "\n(") for v in values])
    axes.set_xlabel(key)
    axes.set_ylabel("metric (mean ± spread over seeds)")
    axes.set_title(f"{record['name']}: vs {key}")
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def compare_ablation(uri: str, experiment: str, parent_run_id: str | None, out_dir: str | Path) -> str:
    """Write tables.md, results.csv and vs_<key>.png into out_dir and onto the parent run
    (as `compare/`); returns the Markdown."""
    import mlflow

    record, outcomes, parent_run_id = read_outcomes(uri, experiment, parent_run_id)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    markdown = tables(record, outcomes)
    (out_dir / "tables.md").write_text(markdown)
    (out_dir / "results.csv").write_text(csv_text(record, outcomes))
    for key in record["varied"]:
        plot(record, outcomes, key, out_dir / f"vs_{key.replace('.', '_')}.png")
    try:
        mlflow.MlflowClient(uri).log_artifacts(parent_run_id, str(out_dir), "compare")
    except mlflow.exceptions.MlflowException as e:  # the files are written; the store may be read-only
        print(f"(not logged to the parent run: {e})")
    return markdown
