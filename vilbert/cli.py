"""`vilbert` command line: thin wrappers that parse arguments and call the library."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass


def _convert_official(args: argparse.Namespace) -> int:
    from vilbert.convert import convert_official

    model, report = convert_official(args.config, args.checkpoint, args.out, args.model)
    print(report.summary())
    print(f"wrote {type(model).__name__} to {args.out}")
    return 0


def _pretrain(args: argparse.Namespace) -> int:
    import os

    from vilbert.train import load_config, pretrain
    from vilbert.train.tracking import default_uri, read_metrics

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
    print(f"model: {config.output_dir}/model (save_pretrained); metrics: {config.output_dir}/metrics.jsonl")
    if metrics.get("mlflow_run_id"):
        uri = config.tracking.uri or default_uri(config.output_dir)
        print(f"MLflow run {metrics['mlflow_run_id']}; open the UI with:\n    mlflow ui --backend-store-uri {uri}")
    return 0


def _check_pretrain(args: argparse.Namespace) -> None:
    """What can be checked before a job waits in a queue: the config, and the output directory."""
    from vilbert.train import load_config
    from vilbert.train.run_dir import plan

    plan(load_config(args.config, args.overrides), args.resume, args.overwrite)


def _export(args: argparse.Namespace) -> int:
    from vilbert.train.checkpoint import export

    export(args.checkpoint_dir, args.out_dir, args.tag)
    print(f"wrote {args.out_dir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vilbert", description="ViLBERT pretraining and fine-tuning.")
    # The deepspeed launcher passes --local_rank=N before the subcommand; LOCAL_RANK says the same.
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", required=True)

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
    pretrain.add_argument("--config", help="training YAML (see configs/)")
    pretrain.add_argument("--resume", default="none",
                          help="'auto': continue the output directory's run from its newest complete checkpoint "
                               "(its metrics and MLflow run too); a tag (stepNNNNNNNN); or 'none' (default), which "
                               "refuses a directory that already holds a run")
    pretrain.add_argument("--overwrite", action="store_true",
                          help="delete the run held in the output directory (checkpoints, metrics, exported model) "
                               "and start again")
    pretrain.add_argument("overrides", nargs="*", metavar="key=value")
    pretrain.set_defaults(run=_pretrain, check=_check_pretrain, launchable=True)

    export = commands.add_parser("export", help="write a checkpoint as a save_pretrained model (fp32)",
                                 description="Turn a DeepSpeed checkpoint directory (any ZeRO stage) into a "
                                             "save_pretrained directory for fine-tuning and sharing.")
    export.add_argument("checkpoint_dir")
    export.add_argument("out_dir")
    export.add_argument("--tag", help="checkpoint tag (default: the newest complete one)")
    export.set_defaults(run=_export)
    return parser


@dataclass(frozen=True)
class LaunchableCommand:
    parser: argparse.ArgumentParser
    check: Callable[[argparse.Namespace], None] | None  # raises before submission what would fail in the job
    resumable: bool  # takes --resume: a requeued job continues with --resume auto


def launchable_commands() -> dict[str, LaunchableCommand]:
    """The subcommands that train or evaluate (`launchable=True`), which `launch/slurm.py` runs."""
    parser = build_parser()
    subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    return {name: LaunchableCommand(sub, sub.get_default("check"), "--resume" in sub._option_string_actions)
            for name, sub in subcommands.items() if sub.get_default("launchable")}


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done, 1 error, 2 bad arguments or a run already in the output
    directory, 128 + N stopped by signal N after writing a checkpoint (143: SIGTERM)."""
    from vilbert.train.interrupt import TrainingInterrupted
    from vilbert.train.run_dir import RunExists

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except RunExists as e:
        print(f"vilbert {args.command}: {e}", file=sys.stderr)
        return 2
    except TrainingInterrupted as e:
        print(f"vilbert {args.command}: {e}", file=sys.stderr)
        return e.exit_status


if __name__ == "__main__":
    sys.exit(main())
