"""`python -m shards`: write shard sets from detector output, check them, or generate the toy world."""

from __future__ import annotations

import argparse
import sys


def _count(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


LENIENT_HELP = ("skip inputs that are wrong but parse (captions or questions without an image, images without "
                "captions or features, unreadable or inconsistent feature records), count them and name the first "
                "few, instead of stopping at the first")


def _add_shard_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("shards")
    group.add_argument("--samples-per-shard", type=_count, default=1000)
    group.add_argument("--max-shard-bytes", type=_count, default=None, help="also start a new shard past this size")
    group.add_argument("--val-fraction", type=_fraction, default=0.0, help="images (by id hash) that go to val/")
    group.add_argument("--seed", type=int, default=0, help="the deterministic shuffle and the split")
    group.add_argument("--feature-dtype", choices=("float16", "float32"), default="float16")
    group.add_argument("--class-topk", type=_count, default=32,
                       help="classes kept per region distribution (>= the class count: all, float16)")
    group.add_argument("--prefix", default="shard")


def _span(text: str) -> tuple[int, int]:
    """argparse type: LOW-HIGH (or one number), inclusive."""
    low, _, high = text.partition("-")
    try:
        return int(low), int(high or low)
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes LOW-HIGH, e.g. 2-4, got {text!r}") from None


def _add_world_options(parser: argparse.ArgumentParser) -> None:
    """The toy world's `WorldOptions`, one flag each; toyworld and toyvqa take the same ones,
    so that VQA images come from the world the model was pretrained on."""
    from shards.toyworld import WorldOptions

    default = WorldOptions()
    group = parser.add_argument_group("the toy world (defaults: the toy-transfer recipe)")
    group.add_argument("--classes", type=int, default=default.classes, help="object classes (the first N)")
    group.add_argument("--colours", type=int, default=default.colours, help="colours (the first N)")
    group.add_argument("--objects", type=_span, default=default.objects, metavar="LOW-HIGH", help="per scene")
    group.add_argument("--boxes-per-object", type=_span, default=default.boxes_per_object, metavar="LOW-HIGH",
                       help="the tight box plus jittered ones")
    group.add_argument("--background-boxes", type=_span, default=default.background_boxes, metavar="LOW-HIGH")
    group.add_argument("--min-regions", type=int, default=default.min_regions)
    group.add_argument("--noise", type=float, default=default.noise, help="std of every region's latent noise")
    group.add_argument("--listing-colours", action=argparse.BooleanOptionalAction, default=default.listing_colours,
                       help="listing captions name each object's colour")
    group.add_argument("--detector-colours", action=argparse.BooleanOptionalAction, default=default.detector_colours,
                       help="the detector's classes are colour-object pairs (its class distribution tells colours "
                            "apart, as an attribute-aware detector's)")
    group.add_argument("--setting-mention", type=float, default=default.setting_mention,
                       help="how often a caption names the scene's setting (the setting is in every region: "
                            "captions that name it let alignment be learnt from the setting alone)")


def _world(args):
    from shards.toyworld import WorldOptions

    return WorldOptions(classes=args.classes, colours=args.colours, objects=args.objects,
                        boxes_per_object=args.boxes_per_object, background_boxes=args.background_boxes,
                        min_regions=args.min_regions, noise=args.noise, setting_mention=args.setting_mention,
                        listing_colours=args.listing_colours, detector_colours=args.detector_colours)


def _options(args):
    from shards.build import ShardOptions

    return ShardOptions(samples_per_shard=args.samples_per_shard, max_shard_bytes=args.max_shard_bytes,
                        val_fraction=args.val_fraction, seed=args.seed, feature_dtype=args.feature_dtype,
                        class_topk=args.class_topk, prefix=args.prefix)


def _write(args) -> int:
    from shards.build import write_shard_sets
    from shards.sources import read_captions, select_boxes

    source = _source(args.tsv, args.features_dir, args.allow_pickle)
    low, high = args.keep_boxes
    indexes = write_shard_sets(
        source.ids, source.load, read_captions(args.captions), args.out, _options(args),
        source=" ".join(args.tsv) if args.tsv else str(args.features_dir),
        prepare=lambda record: select_boxes(record, low, high, args.conf_threshold), max_regions=high,
        lenient=args.lenient)
    for split, index in indexes.items():
        print(f"{split}: {index.num_samples} samples in {len(index.shards)} shards -> {args.out}/{split}")
    return 0


def _check(args) -> int:
    from shards.check import check_shards, objectives

    good, problems = check_shards(args.shards)
    for problem in problems:
        print(problem)
    print(f"{good} good samples, {len(problems)} problems")
    if supported := objectives(args.shards):
        print(supported)
    return 1 if problems else 0


def _toyworld(args) -> int:
    from shards.toyworld import write_toyworld

    indexes = write_toyworld(args.out, args.images, args.val_images, seed=args.seed, feature_dim=args.feature_dim,
                             options=_options(args), workers=args.workers, world=_world(args))
    for split, index in indexes.items():
        print(f"{split}: {index.num_samples} images in {len(index.shards)} shards -> {args.out}/{split}")
    return 0


def _named_files(values: list[str], flag: str) -> dict[str, str]:
    named = {}
    for value in values or []:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"{flag} takes SPLIT=FILE (e.g. train=v2_OpenEnded_mscoco_train2014_questions.json), "
                             f"got {value!r}")
        named[name] = path
    return named


def _print_task_sets(report: dict[str, dict], out) -> None:
    for name, r in report.items():
        missing = f"; {r['images_without_features']} images without features left out" \
            if r["images_without_features"] else ""
        print(f"{name}: {r['records']} {r['noun']}s on {r['images']} images, {r['bytes'] / 1e6:.1f} MB "
              f"({r['bytes_per_record'] / 1e3:.1f} kB per {r['noun']}){missing} -> {out}/{name}")


def _source(tsv, features_dir, allow_pickle: bool):
    from shards.sources import FeatureFolderSource, TsvSource

    return TsvSource(tsv) if tsv else FeatureFolderSource(features_dir, allow_pickle)


def _task_inputs(args, ground_truth: str = "") -> dict:
    """The keyword arguments every task converter takes from the shared flags
    (`_add_task_inputs`): the detector's regions (read, box selection) and, where the task
    adds them, the ground-truth boxes' features (`ground_truth`: what goes without them)."""
    from shards.sources import select_boxes

    low, high = args.keep_boxes
    inputs = dict(prepare=lambda record: select_boxes(record, low, high, args.conf_threshold), max_regions=high,
                  source_name=" ".join(args.tsv) if args.tsv else str(args.features_dir), lenient=args.lenient)
    if ground_truth:
        given = args.gt_tsv or args.gt_features_dir
        inputs["gt_source"] = _source(args.gt_tsv, args.gt_features_dir, args.allow_pickle) if given else None
        if not given:
            print(f"note: no --gt-tsv/--gt-features-dir: {ground_truth} (the paper adds the ground-truth boxes)",
                  file=sys.stderr)
    return inputs


def _vqa(args) -> int:
    from shards.vqa import read_questions, write_vqa_sets

    questions, annotations = _named_files(args.questions, "--questions"), _named_files(args.annotations,
                                                                                        "--annotations")
    unknown = set(annotations) - set(questions)
    if unknown:
        raise SystemExit(f"--annotations for {sorted(unknown)} without --questions for them")
    splits = {name: read_questions(path, annotations.get(name)) for name, path in questions.items()}
    report = write_vqa_sets(splits, _source(args.tsv, args.features_dir, args.allow_pickle), args.out,
                            _options(args), minival=args.minival, min_answer_count=args.min_answer_count,
                            **_task_inputs(args))
    _print_task_sets(report, args.out)
    return 0


def _refcoco(args) -> int:
    from shards.refcoco import read_refs, write_refer_sets

    report = write_refer_sets(read_refs(args.refs, args.instances),
                              _source(args.tsv, args.features_dir, args.allow_pickle), args.out, _options(args),
                              **_task_inputs(args, "the train split's regions are the detector's only"))
    _print_task_sets(report, args.out)
    return 0


def _vcr(args) -> int:
    from shards.vcr import metadata_files, read_annotations, write_vcr_sets

    splits = {name: read_annotations(path) for name, path in _named_files(args.annotations, "--annotations").items()}
    report = write_vcr_sets(splits, metadata_files(splits, args.images_dir),
                            _source(args.tsv, args.features_dir, args.allow_pickle), args.out, _options(args),
                            **_task_inputs(args, "the regions are the detector's only"))
    _print_task_sets(report, args.out)
    return 0


def _retrieval(args) -> int:
    from shards.retrieval import read_karpathy, write_retrieval_sets

    report = write_retrieval_sets(read_karpathy(args.karpathy), _source(args.tsv, args.features_dir, args.allow_pickle),
                                  args.out, _options(args), **_task_inputs(args))
    _print_task_sets(report, args.out)
    return 0


def _neighbours(args) -> int:
    from shards.neighbours import NEIGHBOURS, write_hard_negatives

    print(f"wrote {write_hard_negatives(args.shards, args.k or NEIGHBOURS)}")
    return 0


def _toy_task(args) -> int:
    """`toyvqa`, `toyrefcoco`, `toyvcr`: a toy-world task's train/ and val/ shard sets."""
    import importlib

    module, writer = TOY_TASKS[args.command][:2]
    write = getattr(importlib.import_module(module), writer)
    report = write(args.out, args.images, args.val_images, seed=args.seed, feature_dim=args.feature_dim,
                   options=_options(args), world=_world(args))
    _print_task_sets(report, args.out)
    return 0


# command -> (module, writer, help, what one training image gives)
TOY_TASKS = {
    "toyvqa": ("shards.toyvqa", "write_toy_vqa", "toy-world VQA", "5 questions"),
    "toyrefcoco": ("shards.toyrefcoco", "write_toy_refcoco", "toy-world referring-expression", "up to 3 expressions"),
    "toyvcr": ("shards.toyvcr", "write_toy_vcr", "toy-world VCR", "2 questions"),
    "toyretrieval": ("shards.toyretrieval", "write_toy_retrieval", "toy-world image-retrieval", "3-5 captions"),
}


def _add_task_inputs(parser: argparse.ArgumentParser, ground_truth: str = "") -> None:
    """The flags every task converter shares: the detector's features and box selection, the
    output, and (`ground_truth`: their help) the ground-truth boxes' features."""
    features = parser.add_mutually_exclusive_group(required=True)
    features.add_argument("--tsv", nargs="+", help="bottom-up-attention TSV files of the images")
    features.add_argument("--features-dir", help="folder of per-image .npz/.npy files")
    if ground_truth:
        gt = parser.add_mutually_exclusive_group()
        gt.add_argument("--gt-tsv", nargs="+", help=f"TSV files of features at {ground_truth}")
        gt.add_argument("--gt-features-dir", help=f"folder of per-image .npz/.npy features at {ground_truth}")
    parser.add_argument("--allow-pickle", action="store_true", help="as for `write`")
    parser.add_argument("--lenient", action="store_true", help=LENIENT_HELP)
    parser.add_argument("--out", required=True)
    parser.add_argument("--keep-boxes", nargs=2, type=int, default=(10, 100), metavar=("MIN", "MAX"))
    parser.add_argument("--conf-threshold", type=float, default=0.2)
    _add_shard_options(parser)
    parser.set_defaults(samples_per_shard=250)  # ~100 MB of 100 x 2048 float16 regions per shard


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m shards", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    commands = parser.add_subparsers(dest="command", required=True)

    write = commands.add_parser("write", help="build shard sets from detector features and captions",
                                description="Build train/val shard sets from bottom-up-attention TSV files or a "
                                            "folder of per-image .npy/.npz feature files, joined with captions.")
    inputs = write.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--tsv", nargs="+", help="bottom-up-attention TSV files")
    inputs.add_argument("--features-dir", help="folder of per-image .npz/.npy files")
    write.add_argument("--captions", required=True, help="JSON or JSONL: image id -> caption(s)")
    write.add_argument("--out", required=True, help="output directory (train/ and val/ inside)")
    write.add_argument("--keep-boxes", nargs=2, type=int, default=(10, 36), metavar=("MIN", "MAX"))
    write.add_argument("--conf-threshold", type=float, default=0.2, help="detector confidence to keep a box")
    write.add_argument("--allow-pickle", action="store_true",
                       help="read .npy files holding pickled dicts (unpickling runs code: trusted files only)")
    write.add_argument("--lenient", action="store_true", help=LENIENT_HELP)
    _add_shard_options(write)
    write.set_defaults(run=_write)

    check = commands.add_parser("check", help="decode every sample and report bad ones (exit 1 if any)")
    check.add_argument("shards", help="shard-set directory, index.json, or URL pattern")
    check.set_defaults(run=_check)

    toy = commands.add_parser("toyworld", help="generate the procedural toy world as a shard set")
    toy.add_argument("--out", required=True)
    toy.add_argument("--images", type=_count, default=20000, help="training images")
    toy.add_argument("--val-images", type=int, default=2000)
    toy.add_argument("--feature-dim", type=_count, default=2048)
    toy.add_argument("--workers", type=_count, default=2, help="processes generating shards")
    _add_world_options(toy)
    _add_shard_options(toy)
    toy.set_defaults(run=_toyworld)

    vqa = commands.add_parser(
        "vqa", help="build VQA 2.0 task shards from the official questions/annotations and detector features",
        description="One sample per image (features once, all its questions in meta). With train and val given, "
                    "writes the paper's trainval (train + val minus minival) and minival; test splits (questions "
                    "only) become sets of their own. The answer vocabulary comes from the train+val annotations.")
    vqa.add_argument("--questions", nargs="+", required=True, metavar="SPLIT=FILE",
                     help="e.g. train=v2_OpenEnded_mscoco_train2014_questions.json val=... test-dev=...")
    vqa.add_argument("--annotations", nargs="*", default=[], metavar="SPLIT=FILE",
                     help="e.g. train=v2_mscoco_train2014_annotations.json val=...")
    vqa.add_argument("--minival", type=int, default=3000, help="val questions held out as minival (0: none)")
    vqa.add_argument("--min-answer-count", type=int, default=9, help="questions an answer must be the answer of")
    _add_task_inputs(vqa)
    vqa.set_defaults(run=_vqa)

    refcoco = commands.add_parser(
        "refcoco", help="build referring-expression task shards (RefCOCO+, RefCOCO, RefCOCOg) from the refer "
                        "toolkit's files and detector features",
        description="One sample per image (regions once, all its expressions in meta), one shard set per split of "
                    "the refs (train, val, testA, testB). The train split's regions are the detector's plus the "
                    "ground-truth boxes' (--gt-tsv / --gt-features-dir), as the paper trains. refs(unc).p is a "
                    "pickle: it is read without running anything, and refused if it names any class or function.")
    refcoco.add_argument("--refs", required=True, help="refs(unc).p of the dataset (refcoco+/refs(unc).p)")
    refcoco.add_argument("--instances", required=True, help="its instances.json (the referred boxes)")
    _add_task_inputs(refcoco, "the ground-truth boxes (train split)")
    refcoco.set_defaults(run=_refcoco)

    vcr = commands.add_parser(
        "vcr", help="build VCR task shards (Q->A, QA->R) from the annotation JSONL files, the images' metadata and "
                    "detector features",
        description="One sample per image (regions once, all its questions in meta), one shard set per annotation "
                    "file. The ground-truth boxes' features (--gt-tsv / --gt-features-dir, rows in the metadata's "
                    "box order) are added after the detector's regions, as the paper does. Features are keyed by "
                    "VCR's img_id (e.g. train-123).")
    vcr.add_argument("--annotations", nargs="+", required=True, metavar="SPLIT=FILE",
                     help="e.g. train=train.jsonl val=val.jsonl test=test.jsonl")
    vcr.add_argument("--images-dir", required=True, help="vcr1images/: the records' metadata_fn are under it")
    _add_task_inputs(vcr, "the metadata boxes")
    vcr.set_defaults(run=_vcr)

    retrieval = commands.add_parser(
        "retrieval", help="build image-retrieval task shards (Flickr30k, COCO) from a Karpathy-split dataset JSON "
                          "and detector features",
        description="One sample per image (regions once, its captions), one shard set per split (train with "
                    "restval, val, test), and the train set's hard negatives (each image's nearest neighbours by "
                    "mean region feature) beside it.")
    retrieval.add_argument("--karpathy", required=True, help="e.g. dataset_flickr30k.json")
    _add_task_inputs(retrieval)
    retrieval.set_defaults(run=_retrieval)

    neighbours = commands.add_parser(
        "neighbours", help="compute a shard set's hard negatives for retrieval training (once; cached beside it)",
        description="Each image's nearest neighbours among the set's images by cosine similarity of mean region "
                    "features, written beside the shards, where retrieval training draws its hard negatives.")
    neighbours.add_argument("shards", help="shard-set directory")
    neighbours.add_argument("--k", type=_count, help="neighbours per image (default: 100, the official pool's size)")
    neighbours.set_defaults(run=_neighbours)

    for command, (_, _, what, per_image) in TOY_TASKS.items():
        toy_task = commands.add_parser(command, help=f"generate {what} task shards (train/ and val/)")
        toy_task.add_argument("--out", required=True)
        toy_task.add_argument("--images", type=_count, default=4000, help=f"training images ({per_image} each)")
        toy_task.add_argument("--val-images", type=int, default=500)
        toy_task.add_argument("--feature-dim", type=_count, default=2048, help="as the toy world it goes with")
        _add_world_options(toy_task)
        _add_shard_options(toy_task)
        toy_task.set_defaults(run=_toy_task, samples_per_shard=250)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done, 1 an error (one line naming its input; --debug: the traceback)
    or problems found by `check`, 2 bad arguments."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, OSError) as e:  # InputError, unreadable files and indexes: the user's to fix
        if args.debug:
            raise
        print(f"python -m shards {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
