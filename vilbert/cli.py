"""`vilbert` command line: thin wrappers that parse arguments and call the library."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

from vilbert.data.errors import DataError


def _convert_official(args: argparse.Namespace) -> int:
    from vilbert.convert import convert_official

    model, report = convert_official(args.config, args.checkpoint, args.out, args.model)
    print(report.summary())
    print(f"wrote {type(model).__name__} to {args.out}")
    return 0


def _pretrain(args: argparse.Namespace) -> int:
    from vilbert.train import load_config, pretrain
    from vilbert.train.tracking import read_metrics

    config = load_config(args.config, args.overrides)
    metrics = pretrain(config, resume=args.resume, overwrite=args.overwrite)
    if os.environ.get("RANK", "0") != "0":
        return 0
    losses = [m["train/loss"] for m in read_metrics(config.output_dir) if "train/loss" in m]
    print(f"\ntrain loss: {sum(losses[:3]) / len(losses[:3]):.3f} over the first logged steps -> "
          f"{sum(losses[-3:]) / len(losses[-3:]):.3f} over the last")
    if "val/alignment_accuracy" in metrics:
        print(f"held-out: alignment accuracy {metrics['val/alignment_accuracy']:.3f} (chance 0.5), masked-LM "
              f"accuracy {metrics['val/mlm_accuracy']:.3f}, loss {metrics['val/loss']:.3f}")
        from vilbert.probes import describe

        probed = describe({k.removeprefix("val/"): v for k, v in metrics.items() if k.startswith("val/")})
        if probed:
            print(probed.replace("\n", "\n          "))
    print(f"model: {config.output_dir}/model (save_pretrained); metrics: {config.output_dir}/metrics.jsonl")
    _print_mlflow(config, metrics)
    return 0


def _print_mlflow(config, metrics: dict) -> None:
    """The run's MLflow run, and how to open it in the UI."""
    if not metrics.get("mlflow_run_id"):
        return
    from vilbert.train.tracking import default_uri, experiment_of, ui_hint

    uri = config.tracking.uri or default_uri(config.output_dir)
    print(f"MLflow run {metrics['mlflow_run_id']}; {ui_hint(uri, experiment_of(uri, metrics['mlflow_run_id']))}")


def _finetune_config(args: argparse.Namespace):
    from vilbert.tasks import task_class
    from vilbert.train import load_config

    task_class(args.task)  # an unknown task fails here, naming the known ones
    config = load_config(args.config, args.overrides)
    if config.task.get("name", args.task) != args.task:
        raise ValueError(f"--task {args.task} but the config's task.name is {config.task['name']!r}")
    config.task = {"name": args.task, **config.task}
    return config


def _finetune(args: argparse.Namespace) -> int:
    from vilbert.train.loop import finetune

    config = _finetune_config(args)
    metrics = finetune(config, resume=args.resume, overwrite=args.overwrite)
    if os.environ.get("RANK", "0") != "0":
        return 0
    from vilbert.tasks import task_class
    from vilbert.train.objective import best_names

    value_name, step_name = best_names(f"val/{task_class(args.task).val_metric}")
    best = {value_name: metrics[value_name]} if value_name in metrics else {}
    for name, value in best.items():
        print(f"\n{name}: {value:.4f} at step {int(metrics[step_name])}")
    which = "the best checkpoint" if best else "the last step's: no validation metric"
    print(f"model ({which}): {config.output_dir}/model; metrics: {config.output_dir}/metrics.jsonl\n"
          f"evaluate it with: vilbert evaluate --task {args.task} --checkpoint {config.output_dir} --split val")
    _print_mlflow(config, metrics)
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from vilbert.train.finetuning import evaluate_run, evaluate_zero_shot

    overrides = [*args.overrides, *([f"task.max_images={args.max_images}"] if args.max_images else [])]
    if args.zero_shot:
        if args.tag:
            raise ValueError("--tag picks a fine-tuning checkpoint; --zero-shot evaluates a pretrained model directory")
        metrics = evaluate_zero_shot(args.checkpoint, args.split, args.task, args.out, overrides)
    else:
        metrics = evaluate_run(args.checkpoint, args.split, args.out, args.tag, overrides)
    if os.environ.get("RANK", "0") == "0":
        for name, value in metrics.items():
            print(f"{args.split} {name}: {value:.4f}")
        if not metrics:
            print(f"{args.split} has no answers: predictions written for the evaluation server")
    return 0


def _ablate(args: argparse.Namespace) -> int:
    from vilbert.ablation.local import run_ablation
    from vilbert.ablation.spec import load_ablation

    failed = run_ablation(load_ablation(args.file), dry_run=args.dry_run)
    if failed:
        print(f"{len(failed)} job(s) failed: {', '.join(failed)}; rerun the same command to retry them "
              f"(finished jobs are skipped)", file=sys.stderr)
    return 1 if failed else 0


def _compare(args: argparse.Namespace) -> int:
    from vilbert.ablation.compare import compare_ablation

    print(compare_ablation(args.tracking_uri, args.experiment, args.parent, args.out))
    print(f"tables, CSV and plots in {args.out} (and under compare/ in the parent run's artifacts)")
    return 0


def _check_pretrain(args: argparse.Namespace, world_size: int) -> None:
    """What can be checked before a job waits in a queue: the config, its inputs (shard sets,
    BERT, DeepSpeed file), the batch sizes for `world_size` ranks, and the output directory."""
    from vilbert.train import load_config
    from vilbert.train.preflight import check_run

    check_run(load_config(args.config, args.overrides), world_size, args.resume, args.overwrite)


def _check_finetune(args: argparse.Namespace, world_size: int) -> None:
    from vilbert.train.preflight import check_run

    check_run(_finetune_config(args), world_size, args.resume, args.overwrite)


def _export(args: argparse.Namespace) -> int:
    from vilbert.train.checkpoint import export

    export(args.checkpoint_dir, args.out_dir, args.tag)
    print(f"wrote {args.out_dir}")
    return 0


def _check_evaluate(args: argparse.Namespace, world_size: int) -> None:
    from pathlib import Path

    from vilbert.tasks import task_class

    task_class(args.task)
    needs = "config.json" if args.zero_shot else "config.yaml"
    if not (Path(args.checkpoint) / needs).exists():
        what = "pretrained model directory" if args.zero_shot else "fine-tuning output directory"
        raise FileNotFoundError(f"{args.checkpoint} is not a {what} (no {needs})")


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="training YAML (see configs/)")
    parser.add_argument("--resume", default="none",
                        help="'auto': continue the output directory's run from its newest complete checkpoint "
                             "(its metrics and MLflow run too); a tag (stepNNNNNNNN); or 'none' (default), which "
                             "refuses a directory that already holds a run")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete the run held in the output directory (checkpoints, metrics, exported model) "
                             "and start again")
    parser.add_argument("overrides", nargs="*", metavar="key=value")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vilbert", description="ViLBERT pretraining and fine-tuning.")
    # The deepspeed launcher passes --local_rank=N before the subcommand; LOCAL_RANK says the same.
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="debug logs, and the traceback of an error")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_with_parents(common))

    convert = commands.add_parser(
        "convert-official", help="convert an official ViLBERT checkpoint into a save_pretrained directory",
        description="Map an official ViLBERT checkpoint (vilbert-multi-task / vilbert_beta key names) into "
                    "this project's model and write it with save_pretrained. Never executes code from the "
                    "checkpoint (weights_only loading).")
    convert.add_argument("--config", required=True, help="official config JSON, e.g. bert_base_6layer_6conect.json")
    convert.add_argument("--checkpoint", required=True, help="official pytorch_model.bin")
    convert.add_argument("--out", required=True, help="output directory")
    convert.add_argument("--model", choices=("auto", "pretraining", "tasks"), default="auto",
                         help="target model (auto: tasks if the checkpoint has task heads)")
    convert.set_defaults(run=_convert_official)

    pretrain = commands.add_parser(
        "pretrain", help="pretrain ViLBERT (any launcher: python, torchrun, deepspeed, SLURM)",
        description="Pretrain on a shard set with DeepSpeed. Settings come from a YAML file and dotted "
                    "key=value overrides, e.g. optim.lr=5e-5 data.batch_size=16 deepspeed=deepspeed_configs/"
                    "zero3_bf16.json. The resolved config is saved beside the checkpoints.")
    _add_run_arguments(pretrain)
    pretrain.set_defaults(run=_pretrain, check=_check_pretrain, launchable=True)

    finetune = commands.add_parser(
        "finetune", help="fine-tune on a task (any launcher); keeps the best validated checkpoint",
        description="Fine-tune ViLBERTForTasks on a task's shards with the pretraining engine (same YAML, "
                    "overrides, DeepSpeed configs, checkpoints, --resume, MLflow). model.init names the pretrained "
                    "model (empty: the no-pretraining baseline). Evaluates on eval.shards and exports the best "
                    "checkpoint to <output_dir>/model.")
    finetune.add_argument("--task", required=True, help="a module of vilbert/tasks/, e.g. vqa")
    _add_run_arguments(finetune)
    finetune.set_defaults(run=_finetune, check=_check_finetune, launchable=True)

    evaluate = commands.add_parser(
        "evaluate", help="evaluate a fine-tuned run on a split; write the server's results JSON",
        description="Predict every example of a split once (across all ranks under any launcher), report the "
                    "task's official metric when the split has labels, write the predictions in the evaluation "
                    "server's format, and add the metrics to the run's MLflow run (test/..., or val/...).")
    evaluate.add_argument("--task", required=True)
    evaluate.add_argument("--checkpoint", required=True,
                          help="the fine-tuning output directory (--zero-shot: a pretrained model directory)")
    evaluate.add_argument("--split", required=True,
                          help="'val' (the run's eval.shards), 'train', or a shard set, e.g. data/vqa/test-dev")
    evaluate.add_argument("--out", help="results JSON (default: <checkpoint>/results-<split>.json)")
    evaluate.add_argument("--tag", help="a checkpoint tag instead of the best model")
    evaluate.add_argument("--zero-shot", action="store_true",
                          help="evaluate a pretrained model as it is, scoring with its pretraining heads (retrieval: "
                               "P(aligned) of the alignment head); --split is then a shard set")
    evaluate.add_argument("--max-images", type=int, default=0,
                          help="retrieval: only the split's first N images and their captions (quick runs)")
    evaluate.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. data.batch_size=512")
    evaluate.set_defaults(run=_evaluate, check=_check_evaluate, launchable=True)

    ablate = commands.add_parser(
        "ablate", help="run an ablation file's grid here: pretraining cells, then their fine-tunes",
        description="Run every job of an ablation file (configs/ablations/) one after another, each as its own "
                    "`vilbert pretrain` / `vilbert finetune` process, under one MLflow parent run. A rerun skips "
                    "finished jobs and resumes stopped ones; a failed job does not stop the others. Ends with "
                    "`vilbert compare`'s tables in <output_dir>/compare. On SLURM: python launch/slurm.py sweep FILE.")
    ablate.add_argument("file", help="ablation YAML, e.g. configs/ablations/paper_toy.yaml")
    ablate.add_argument("--dry-run", action="store_true", help="list the cells and jobs (and their state) and stop")
    ablate.set_defaults(run=_ablate)

    compare = commands.add_parser(
        "compare", help="an ablation's tables (Markdown, CSV) and plots, from the tracking store",
        description="Read an ablation's runs from MLflow and write the paper's tables (every configuration; "
                    "Table 1, architecture x pretraining; each task vs each varied key) and plots (vs each key, "
                    "mean and spread over seeds). Failed, running or missing jobs show as such.")
    compare.add_argument("--experiment", required=True, help="the ablation file's experiment")
    compare.add_argument("--parent", help="the ablation's parent run id (default: the newest ablation)")
    compare.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI")
                         or "sqlite:///runs/ablations/mlflow.db",
                         help="the store (default: $MLFLOW_TRACKING_URI, else the ablations' default)")
    compare.add_argument("--out", default="runs/ablations/compare", help="folder for tables.md, results.csv, PNGs")
    compare.set_defaults(run=_compare)

    export = commands.add_parser("export", help="write a checkpoint as a save_pretrained model (fp32)",
                                 description="Turn a DeepSpeed checkpoint directory (any ZeRO stage) into a "
                                             "save_pretrained directory for fine-tuning and sharing.")
    export.add_argument("checkpoint_dir")
    export.add_argument("out_dir")
    export.add_argument("--tag", help="checkpoint tag (default: the newest complete one)")
    export.set_defaults(run=_export)
    return parser


def _with_parents(*parents: argparse.ArgumentParser):
    """A subparser class that adds the common options to every subcommand."""
    class Subcommand(argparse.ArgumentParser):
        def __init__(self, **kwargs):
            super().__init__(**kwargs, parents=[*kwargs.pop("parents", []), *parents])
    return Subcommand


@dataclass(frozen=True)
class LaunchableCommand:
    parser: argparse.ArgumentParser
    check: Callable[[argparse.Namespace, int], None] | None  # (args, world size): raises before submission
    #                                                           what would fail in the job
    resumable: bool  # takes --resume: a requeued job continues with --resume auto


def launchable_commands() -> dict[str, LaunchableCommand]:
    """The subcommands that train or evaluate (`launchable=True`), which `launch/slurm.py` runs."""
    parser = build_parser()
    subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    return {name: LaunchableCommand(sub, sub.get_default("check"), "--resume" in sub._option_string_actions)
            for name, sub in subcommands.items() if sub.get_default("launchable")}


def _failed(line: str, status: int, errors: list[str] | None) -> int:
    print(line, file=sys.stderr)
    if errors is not None:
        errors.append(line)
    return status


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Like parse_args, but key=value overrides may come anywhere (argparse takes positionals
    only before or after the options: `--resume auto optim.lr=1e-4 --debug` would stop it)."""
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*(args.overrides or []), *extra]
    return args


def main(argv: list[str] | None = None, errors: list[str] | None = None) -> int:
    """Exit status: 0 done, 1 error (one line: a bad config value, a missing file, data that
    cannot feed the run; with --debug the traceback), 2 bad arguments or a run already in the
    output directory, 3 a rank was lost (hung or dead: resume from the last checkpoint), 128 + N
    stopped by signal N after writing a checkpoint (143: SIGTERM). `errors` receives the line
    printed for a failure (a SLURM job names its cause with it)."""
    args = parse_args(build_parser(), argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    from vilbert.train.heartbeat import RANK_LOST_EXIT, RankLost
    from vilbert.train.interrupt import TrainingInterrupted
    from vilbert.train.run_dir import RunExists

    try:
        return args.run(args)
    except RunExists as e:
        return _failed(f"vilbert {args.command}: {e}", 2, errors)
    except TrainingInterrupted as e:
        print(f"vilbert {args.command}: {e}", file=sys.stderr)
        return e.exit_status
    except RankLost as e:
        if args.debug:
            raise
        return _failed(f"vilbert {args.command}: error: {e}", RANK_LOST_EXIT, errors)
    except (ValueError, OSError, DataError) as e:  # the user's to fix: say what, not where in our code
        if args.debug:
            raise
        return _failed(f"vilbert {args.command}: error: {e}", 1, errors)


if __name__ == "__main__":
    sys.exit(main())
