"""What the visual stream knows about each object, apart from any words: a linear probe of the
region outputs of pretrained models for the object's colour and class.

For each region of each object of held-out toy-world scenes (its tight box and the looser
ones, partly background), the region stream's output (the image with an empty caption) is
the probe's input; a logistic regression, fitted on the
objects of 70% of the images, predicts the colour and the class of the objects of the rest.
The detector's input features are probed the same way for reference. A stream that keeps
what VQA's colour questions need scores high on colour; one trained towards the detector's
class distribution alone may keep the class and lose the colour.

    python benchmarks/region_probe.py runs/transfer/pretrain-s0-n3000/model runs/transfer/pretrain-s0/model \
        [--none] [--world runs/toyworld/val] [--images 600]

`--none` adds the no-pretraining start (the text stream from MiniLM, the rest fresh, seed 0).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def region_vectors(model, samples: list[dict]) -> tuple[np.ndarray, np.ndarray, list[tuple[int, str, str]]]:
    """(input features, region-stream outputs, (image, colour, class)) of every region of every object."""
    from vilbert.data.tokenizer import CaptionTokenizer, load_tokenizer
    from vilbert.probes import _model_inputs

    tokenizer = CaptionTokenizer(load_tokenizer(None), max_length=8)
    inputs, outputs, labels = [], [], []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(samples), 32):
            batch = samples[start:start + 32]
            x = _model_inputs([""] * len(batch), tokenizer, batch, 36, torch.device("cpu"), torch.float32)
            regions = model.vilbert(**x).region_sequence
            for b, sample in enumerate(batch):
                for obj in sample["meta"]["scene"]["objects"]:
                    for region in obj["regions"]:  # the tight box and the looser ones (part background)
                        inputs.append(x["region_features"][b, region + 1].numpy())  # the IMG token comes first
                        outputs.append(regions[b, region + 1].float().numpy())
                        labels.append((start + b, obj["colour"], obj["name"]))
    return np.stack(inputs), np.stack(outputs), labels


def probe_accuracy(vectors: np.ndarray, labels: list[tuple[int, str, str]], which: int, images: int) -> float:
    """Held-out accuracy of a logistic regression (70% of the images to fit, 30% to test)."""
    names = sorted({label[which] for label in labels})
    y = torch.tensor([names.index(label[which]) for label in labels])
    x = torch.from_numpy(vectors).float()
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    fit = torch.tensor([label[0] < 0.7 * images for label in labels])
    torch.manual_seed(0)
    linear = torch.nn.Linear(x.shape[1], len(names))
    optimizer = torch.optim.Adam(linear.parameters(), lr=1e-2, weight_decay=1e-3)
    for _ in range(300):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(linear(x[fit]), y[fit]).backward()
        optimizer.step()
    with torch.no_grad():
        return float((linear(x[~fit]).argmax(1) == y[~fit]).float().mean())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", help="pretrained save_pretrained directories")
    parser.add_argument("--none", action="store_true", help="also the no-pretraining start")
    parser.add_argument("--world", default="runs/toyworld/val")
    parser.add_argument("--images", type=int, default=600)
    args = parser.parse_args()
    from vilbert import ViLBERTForPretraining
    from vilbert.probes import read_scenes

    samples = read_scenes(args.world, args.images)
    starts = [(path, lambda path=path: ViLBERTForPretraining.from_pretrained(path)) for path in args.models]
    if args.none:
        def fresh():
            from vilbert.model_factory import ModelConfig, build_model

            torch.manual_seed(0)
            shape = {"v_feature_size": samples[0]["features"].shape[1],
                     "v_target_size": samples[0]["cls_prob"].shape[1]}
            return build_model(ModelConfig(preset="small", bert="minilm"), "pretraining", shape)[0]
        starts.insert(0, ("no pretraining", fresh))
    objects = [o for s in samples for o in s["meta"]["scene"]["objects"]]
    print(f"{args.images} held-out images of {args.world}; chance: colour 1/{len({o['colour'] for o in objects})}, "
          f"class 1/{len({o['name'] for o in objects})}")
    print("| start | colour from the detector's features | colour from the region stream | "
          "class from the detector's features | class from the region stream |\n|---|---|---|---|---|")
    for name, load in starts:
        inputs, outputs, labels = region_vectors(load(), samples)
        figures = [probe_accuracy(v, labels, which, args.images) for which in (1, 2) for v in (inputs, outputs)]
        print(f"| {name} | " + " | ".join(f"{f:.3f}" for f in figures) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
