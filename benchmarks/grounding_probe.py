"""Did pretraining ground words in regions? Masked-word accuracy on toy-world captions
"a <colour> <object> <setting>.", with the colour (or the object) masked, given the image's
own regions and given another image's regions. Grounded words are predicted better with the
image's own regions; chance is 1/11 for colours and 1/48 for objects.

    python benchmarks/grounding_probe.py runs/toy/model [--world runs/toyworld/val] [--images 400]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from shards.toyworld import CLASSES, COLOURS
from vilbert import ViLBERTForPretraining
from vilbert.data.collate import lay_out_regions
from vilbert.data.format import ShardIndex, read_checked_samples
from vilbert.data.tokenizer import CaptionTokenizer, load_tokenizer

WORDS = {"colour": (COLOURS, 2), "object": (CLASSES, 3)}  # the word list and its token position after [CLS] a


def probe(model, samples: list[dict], kind: str, own_regions: bool, batch: int = 32) -> float:
    tokenizer = load_tokenizer()
    captions = CaptionTokenizer(tokenizer)
    words, position = WORDS[kind]
    word_ids = torch.tensor(tokenizer.convert_tokens_to_ids(words))
    cases = [(i, f"a {o['colour']} {o['name']} {s['meta']['scene']['setting']}.", o["colour" if kind == "colour"
                                                                                     else "name"])
             for i, s in enumerate(samples) for o in s["meta"]["scene"]["objects"]]
    hits = 0
    for start in range(0, len(cases), batch):
        chunk = cases[start:start + batch]
        input_ids, attention_mask = captions([c for _, c, _ in chunk])
        input_ids[:, position] = tokenizer.mask_token_id
        images = [samples[i if own_regions else (i + 7) % len(samples)] for i, _, _ in chunk]
        features, locations, region_mask, _ = lay_out_regions(images, 36)
        with torch.no_grad():
            out = model(input_ids=input_ids, region_features=features.float(), region_locations=locations,
                        attention_mask=attention_mask, region_mask=region_mask)
        predicted = word_ids[out.text_logits[:, position][:, word_ids].argmax(-1)]
        truth = torch.tensor(tokenizer.convert_tokens_to_ids([w for _, _, w in chunk]))
        hits += int((predicted == truth).sum())
    return hits / len(cases)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a pretrained save_pretrained directory, e.g. runs/toy/model")
    parser.add_argument("--world", default="runs/toyworld/val", help="toy-world shard set (the scenes)")
    parser.add_argument("--images", type=int, default=400)
    args = parser.parse_args()
    model = ViLBERTForPretraining.from_pretrained(args.model).eval()
    index = ShardIndex.read(args.world)
    samples = []
    for shard in index.shards:
        samples += [s for _, s, _ in read_checked_samples(str(Path(args.world) / shard.name)) if s is not None]
        if len(samples) >= args.images:
            break
    samples = samples[:args.images]
    print(f"{args.model} on {len(samples)} images of {args.world}")
    for kind in WORDS:
        own, other = probe(model, samples, kind, True), probe(model, samples, kind, False)
        print(f"masked {kind}: {own:.3f} with its own regions, {other:.3f} with another image's "
              f"(chance {1 / len(WORDS[kind][0]):.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
