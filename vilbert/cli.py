"""`vilbert` command line: thin wrappers that parse arguments and call the library."""

from __future__ import annotations

import argparse
import logging
import sys


def _convert_official(args: argparse.Namespace) -> int:
    from vilbert.convert import convert_official

    model, report = convert_official(args.config, args.checkpoint, args.out, args.model)
    print(report.summary())
    print(f"wrote {type(model).__name__} to {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vilbert", description="ViLBERT pretraining and fine-tuning.")
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
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
