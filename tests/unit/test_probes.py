"""The toy-world probes (vilbert.probes) on hand-built predictors and scorers: one that looks
at the image it is given scores high with its own regions and at chance with another's; one
that ignores the image scores at chance with both."""

import numpy as np
import pytest

from shards.toyworld import ToyWorld, WorldOptions
from vilbert.probes import (
    RETRIEVAL_CANDIDATES,
    describe,
    grounding_accuracy,
    grounding_probe,
    recall_at,
    retrieval_ranks,
    vocabulary,
)


@pytest.fixture(scope="module")
def scenes():
    """Toy-world images as the pipeline decodes them: arrays, captions and meta['scene']."""
    world = ToyWorld(seed=3, feature_dim=8, options=WorldOptions(classes=12, colours=6, objects=(2, 4)))
    return [dict(r, meta={"scene": r["scene"]}) for r in world.generate(0, 150)]


def looking(captions, word_index, images, candidates):
    """Grounded by construction: finds the object the rest of the caption names in the image."""
    predicted = []
    for caption, image in zip(captions, images):
        _, colour, name = caption.rstrip(".").split()
        objects = image["meta"]["scene"]["objects"]
        if word_index == 1:  # the colour of the named object
            found = [o["colour"] for o in objects if o["name"] == name]
        else:  # the object of the named colour
            found = [o["name"] for o in objects if o["colour"] == colour]
        predicted.append(found[0] if found else candidates[0])
    return predicted


def blind(captions, word_index, images, candidates):
    """Ignores the image: always the first candidate."""
    return [candidates[0] for _ in captions]


def test_grounded_predictor_scores_high_with_own_regions_and_chance_with_others(scenes):
    figures = grounding_probe(looking, scenes)
    for kind in ("colour", "object"):
        chance = figures[f"{kind}/chance"]
        assert figures[f"{kind}/own"] > 0.8, figures  # below 1 only where two objects share a name or colour
        assert abs(figures[f"{kind}/other"] - chance) < 0.12, figures
    assert figures["colour/chance"] == 1 / 6 and figures["object/chance"] == 1 / 12


def test_blind_predictor_scores_the_same_with_any_regions(scenes):
    figures = grounding_probe(blind, scenes)
    for kind in ("colour", "object"):
        assert figures[f"{kind}/own"] == figures[f"{kind}/other"] < 0.3, figures


def test_the_probe_masks_the_word_it_asks_for(scenes):
    seen = []

    def record(captions, word_index, images, candidates):
        seen.append((word_index, candidates))
        return blind(captions, word_index, images, candidates)

    grounding_accuracy(record, scenes, "object", own_regions=True)
    assert {i for i, _ in seen} == {2} and seen[0][1] == vocabulary(scenes)["object"]
    with pytest.raises(ValueError, match="toy-world"):
        grounding_accuracy(record, scenes[:1], "colour", own_regions=True)


def matching_words(image, captions):
    """Grounded by construction: how many of the image's object names and colours a caption says."""
    words = {w for o in image["meta"]["scene"]["objects"] for w in (o["name"], o["colour"])}
    return [sum(w.strip(".,") in words for w in c.split()) for c in captions]


def test_retrieval_ranks_a_grounded_scorer_high_and_a_blind_one_at_chance(scenes):
    grounded = recall_at(retrieval_ranks(matching_words, scenes, candidates=100))
    assert grounded["R1"] > 10 / RETRIEVAL_CANDIDATES and grounded["R10"] > 0.6, grounded
    constant = recall_at(retrieval_ranks(lambda image, captions: [0.0] * len(captions), scenes, candidates=100))
    rng = np.random.default_rng(0)
    noise = recall_at(retrieval_ranks(lambda image, captions: rng.normal(size=len(captions)), scenes, candidates=100))
    for blind_figures in (constant, noise):  # 150 queries at chance 0.01 / 0.05 / 0.10
        assert blind_figures["R1"] < 0.05 and 0.01 < blind_figures["R5"] < 0.12, blind_figures


def test_retrieval_queries_and_candidates(scenes):
    calls = []

    def score(image, captions):
        calls.append(len(captions))
        return [1.0] + [0.0] * (len(captions) - 1)  # the own caption is passed first: always rank 1

    ranks = retrieval_ranks(score, scenes, candidates=100, queries=20)
    assert calls == [100] * 20 and (ranks == 1).all()
    with pytest.raises(ValueError, match="at least 100 images"):
        retrieval_ranks(score, scenes[:99], candidates=100)


def test_describe_names_every_figure(scenes):
    text = describe({**{f"grounding/{k}": v for k, v in grounding_probe(looking, scenes).items()},
                     "zero_shot/R1": 0.2, "zero_shot/R5": 0.5, "zero_shot/R10": 0.7,
                     "zero_shot/chance_R1": 0.01})
    assert "masked colour" in text and "masked object" in text and "among 100: R@1 0.200 (chance 0.010)" in text
