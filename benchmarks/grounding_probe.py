"""Did pretraining ground words in regions? The probes of `vilbert.probes` on a saved model:
the masked colour / object word of "a <colour> <object>." with the image's own regions and with
another image's, and zero-shot caption retrieval with the alignment head (R@k among 100).

    python benchmarks/grounding_probe.py runs/toy/model [--world runs/toyworld/val] [--images 400]
"""

from __future__ import annotations

import argparse
import sys

from vilbert.probes import describe


def probe(model_dir: str, world: str, images: int, retrieval_images: int = 100) -> dict[str, float]:
    from vilbert import ViLBERTForPretraining
    from vilbert.probes import RETRIEVAL_CANDIDATES, probe_model, read_scenes

    model = ViLBERTForPretraining.from_pretrained(model_dir)
    samples = read_scenes(world, max(images, retrieval_images, RETRIEVAL_CANDIDATES))
    return probe_model(model, samples[:images], retrieval_images=retrieval_images, retrieval_samples=samples)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a pretrained save_pretrained directory, e.g. runs/toy/model")
    parser.add_argument("--world", default="runs/toyworld/val", help="toy-world shard set (the scenes)")
    parser.add_argument("--images", type=int, default=400)
    args = parser.parse_args()
    print(f"{args.model} on {args.images} images of {args.world}")
    print(describe(probe(args.model, args.world, args.images)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
