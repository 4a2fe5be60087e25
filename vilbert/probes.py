"""What pretraining learnt, read off toy-world scenes (the `meta["scene"]` of held-out samples).

Grounding probe: every object of a scene is described as the toy world describes one object
("a red dog."), its colour (or its name) is masked, and the model predicts it among the
world's colours (or classes), once given the image's own regions and once another image's.
A model that grounds words in regions is right far more often with the image's own regions;
one that reads the words from the caption's template alone scores the same with both.

Zero-shot retrieval: each image ranks its own caption among `candidates` captions (the
others from other images) by the alignment head's probability of "aligned", with no
fine-tuning; R@1 of a model that ignores the image is 1/candidates.

Both take the model as a function, so they are tested on hand-built scorers: `Predictor`
(masked word from captions and images) and `Scorer` (one image against many captions).
`model_predictor` and `model_scorer` wrap a `ViLBERTForPretraining`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

# (captions, the masked word's index in each, images, candidate words) -> the predicted words
Predictor = Callable[[list[str], int, list[dict], list[str]], list[str]]
Scorer = Callable[[dict, list[str]], Sequence[float]]  # (an image, captions) -> one score per caption
RETRIEVAL_CANDIDATES = 100  # captions each image ranks its own among, as in the paper's zero-shot retrieval
KINDS = {"colour": 1, "object": 2}  # the masked word of "a <colour> <object>." (after "a")
OTHER_IMAGE_OFFSET = 7  # "another image": the one 7 places on (a different scene, deterministically)


def read_scenes(shard_set, images: int) -> list[dict]:
    """The first `images` samples of a toy-world shard set (in shard order), with their scenes."""
    from pathlib import Path

    from vilbert.data.shard_index import ShardIndex
    from vilbert.data.tar_reader import read_checked_samples
    index, samples = ShardIndex.read(shard_set), []
    for shard in index.shards:
        samples += [s for _, s, _ in read_checked_samples(str(Path(shard_set) / shard.name)) if s is not None]
        if len(samples) >= images:
            break
    if not samples or "scene" not in samples[0].get("meta", {}):
        raise ValueError(f"{shard_set} is not a toy-world shard set (its samples carry no meta['scene'])")
    return samples[:images]


def scene_objects(samples: list[dict]) -> list[tuple[int, dict]]:
    return [(i, o) for i, s in enumerate(samples) for o in s["meta"]["scene"]["objects"]]


def vocabulary(samples: list[dict]) -> dict[str, list[str]]:
    """The colours and object names the scenes use: the candidates of the probe."""
    objects = [o for _, o in scene_objects(samples)]
    return {"colour": sorted({o["colour"] for o in objects}), "object": sorted({o["name"] for o in objects})}


def grounding_accuracy(predict: Predictor, samples: list[dict], kind: str, own_regions: bool,
                       batch: int = 64) -> float:
    """The fraction of objects whose `kind` word is predicted right, from the image's own
    regions (`own_regions`) or from another image's."""
    cases = scene_objects(samples)
    if not cases or len(samples) < 2:
        raise ValueError("the grounding probe needs toy-world samples (meta['scene']) of at least 2 images")
    candidates, position = vocabulary(samples)[kind], KINDS[kind]
    hits = 0
    for start in range(0, len(cases), batch):
        chunk = cases[start:start + batch]
        captions = [f"a {o['colour']} {o['name']}." for _, o in chunk]
        images = [samples[i if own_regions else (i + OTHER_IMAGE_OFFSET) % len(samples)] for i, _ in chunk]
        predicted = predict(captions, position, images, candidates)
        hits += sum(p == o["colour" if kind == "colour" else "name"] for p, (_, o) in zip(predicted, chunk))
    return hits / len(cases)


def grounding_probe(predict: Predictor, samples: list[dict]) -> dict[str, float]:
    """{"colour/own", "colour/other", "colour/chance", "object/own", ...}."""
    figures = {}
    for kind in KINDS:
        figures[f"{kind}/own"] = grounding_accuracy(predict, samples, kind, True)
        figures[f"{kind}/other"] = grounding_accuracy(predict, samples, kind, False)
        figures[f"{kind}/chance"] = 1 / len(vocabulary(samples)[kind])
    return figures


def retrieval_ranks(score: Scorer, samples: list[dict], candidates: int = 100, queries: int | None = None,
                    seed: int = 0) -> np.ndarray:
    """The rank (1 = first) of the own caption (the first) of each of the first `queries`
    images (default: all) among `candidates` captions: its own and the first captions of
    other images of `samples`, drawn with a seeded generator. Ties are broken at random, so
    that a scorer that ignores the image ranks at chance."""
    if len(samples) < candidates:
        raise ValueError(f"zero-shot retrieval among {candidates} captions needs at least {candidates} images, "
                         f"got {len(samples)}")
    rng = np.random.default_rng(seed)
    ranks = []
    for i, sample in enumerate(samples[:queries]):
        others = rng.choice([j for j in range(len(samples)) if j != i], candidates - 1, replace=False)
        scores = np.asarray(score(sample, [sample["captions"][0]] + [samples[j]["captions"][0] for j in others]),
                            dtype=np.float64)
        higher, tied = int((scores[1:] > scores[0]).sum()), int((scores[1:] == scores[0]).sum())
        ranks.append(1 + higher + int(rng.integers(0, tied + 1)))
    return np.array(ranks)


def recall_at(ranks: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    return {f"R{k}": float((ranks <= k).mean()) for k in ks}


# --- the model as a predictor and a scorer --------------------------------------------------
def _model_inputs(captions, tokenizer, images, max_regions: int, device, dtype):
    from vilbert.data.collate import lay_out_regions

    input_ids, attention_mask = tokenizer(captions)
    features, locations, region_mask, _ = lay_out_regions(images, max_regions)
    return dict(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                region_features=features.to(device, dtype), region_locations=locations.to(device, dtype),
                region_mask=region_mask.to(device))


def model_predictor(model, tokenizer_path=None, max_regions: int = 36, dtype=torch.float32) -> Predictor:
    """The masked word as the model's MLM head predicts it, among the candidates (each must
    be one WordPiece token, as the toy world's words are)."""
    from vilbert.data.tokenizer import CaptionTokenizer, load_tokenizer

    tokenizer = load_tokenizer(tokenizer_path)
    captions_to_ids = CaptionTokenizer(tokenizer)
    device = next(model.parameters()).device

    @torch.no_grad()
    def predict(captions, word_index, images, candidates):
        ids = tokenizer.convert_tokens_to_ids(candidates)
        if tokenizer.unk_token_id in ids:
            raise ValueError(f"the grounding probe needs one-token words; {candidates} has words outside the "
                             "vocabulary")
        inputs = _model_inputs(captions, captions_to_ids, images, max_regions, device, dtype)
        inputs["input_ids"][:, 1 + word_index] = tokenizer.mask_token_id  # after [CLS]
        logits = model(**inputs).text_logits[:, 1 + word_index]
        return [candidates[k] for k in logits[:, ids].argmax(-1).tolist()]

    return predict


def model_scorer(model, tokenizer_path=None, max_regions: int = 36, dtype=torch.float32) -> Scorer:
    """log P(aligned) from the alignment head (label 0 is "aligned")."""
    from vilbert.data.tokenizer import CaptionTokenizer, load_tokenizer

    captions_to_ids = CaptionTokenizer(load_tokenizer(tokenizer_path))
    device = next(model.parameters()).device

    @torch.no_grad()
    def score(image, captions):
        inputs = _model_inputs(captions, captions_to_ids, [image], max_regions, device, dtype)
        for name in ("region_features", "region_locations", "region_mask"):  # one image for every caption
            inputs[name] = inputs[name].expand(len(captions), *inputs[name].shape[1:])
        return model(**inputs).alignment_logits.float().log_softmax(-1)[:, 0].tolist()

    return score


def probe_model(model, samples: list[dict], *, retrieval_images: int = 100, retrieval_samples: list[dict] | None = None,
                candidates: int = RETRIEVAL_CANDIDATES, tokenizer_path=None, max_regions: int = 36,
                dtype=torch.float32) -> dict[str, float]:
    """Both probes of a pretraining model (or its DeepSpeed engine) on toy-world samples, as
    flat metrics: grounding/{colour,object}/{own,other,chance} on `samples` (none when empty),
    zero_shot/R{1,5,10} of the first `retrieval_images` of `retrieval_samples` (default:
    `samples`), each against `candidates` captions (0: no retrieval)."""
    was_training = model.training
    model.eval()
    figures = {}
    try:
        if samples:
            predict = model_predictor(model, tokenizer_path, max_regions, dtype)
            figures.update({f"grounding/{k}": v for k, v in grounding_probe(predict, samples).items()})
        if retrieval_images:
            ranks = retrieval_ranks(model_scorer(model, tokenizer_path, max_regions, dtype),
                                    samples if retrieval_samples is None else retrieval_samples, candidates,
                                    queries=retrieval_images)
            figures.update({f"zero_shot/{k}": v for k, v in recall_at(ranks).items()})
            figures["zero_shot/chance_R1"] = 1 / candidates
    finally:
        model.train(was_training)
    return figures


def describe(figures: dict[str, float]) -> str:
    """The probes' figures (`probe_model`'s names) as lines for people."""
    lines = [f"grounding, masked {kind}: {figures[f'grounding/{kind}/own']:.3f} with the image's own regions, "
             f"{figures[f'grounding/{kind}/other']:.3f} with another image's (chance "
             f"{figures[f'grounding/{kind}/chance']:.3f})" for kind in KINDS if f"grounding/{kind}/own" in figures]
    if "zero_shot/R1" in figures:
        lines.append(f"zero-shot retrieval, own caption among {round(1 / figures['zero_shot/chance_R1'])}: R@1 "
                     f"{figures['zero_shot/R1']:.3f} (chance {figures['zero_shot/chance_R1']:.3f}), R@5 "
                     f"{figures['zero_shot/R5']:.3f}, R@10 {figures['zero_shot/R10']:.3f}")
    return "\n".join(lines)
