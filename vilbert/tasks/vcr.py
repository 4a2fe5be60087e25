"""Visual Commonsense Reasoning (VCR) as the paper fine-tunes it (vilbert_beta
`vlbert_tasks.yml`, `vcr_dataset.py`): Q->A and QA->R, each 4-way multiple choice.

    input:   per choice one sequence: [CLS] question [SEP] answer [SEP] for Q->A (at most 60
             tokens), [CLS] question [SEP] right answer [SEP] rationale [SEP] for QA->R (80);
             the second segment has token type 1; the longer segment is cut first. Object
             tags ([0], [2, 3]) become words: a person's a gender-neutral name, drawn once
             per question (the same in every epoch and on every rank), other objects their
             class name. Up to 100 regions + the IMG token: the detector's, then the image's
             ground-truth boxes (all of these kept; the detector's cut to make room)
    head:    `ViLBERTForTasks.pair_head` on h_IMG * h_CLS: one score per choice
    loss:    softmax cross-entropy over the 4 choices
    metrics: Q->A and QA->R accuracy, and Q->AR: both right on the same question (the metric
             that picks the best checkpoint)

One model learns both: every question gives a Q->A and a QA->R example (a question
without labels, of the test split, gives its Q->A example and a QA->R example for each of
the 4 answers, as the leaderboard wants). The 4 sequences of an example share its image:
the batch holds the image's regions once (`TaskBatch.region_rows`), and the model's inputs
repeat them on the device, so the host never copies an image 4 times.

A shard sample is one image with its questions in `meta["questions"]` (annot_id, question,
answer_choices, rationale_choices as VCR's token lists, answer_label, rationale_label),
the class names of its ground-truth boxes in `meta["names"]` and their number (the last
rows of the regions) in `meta["gt_regions"]`.
"""

from __future__ import annotations

import random
import zlib
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from vilbert.data.collate import lay_out_regions
from vilbert.data.shard_index import ShardIndex
from vilbert.data.tokenizer import CaptionTokenizer, load_tokenizer
from vilbert.tasks.base import Task, TaskBatch

CHOICES = 4
Q_A, QA_R = "q_a", "qa_r"  # the two kinds of example
# Given names used for people of either sex (a list of our own, in the spirit of the
# official code's unisex names table): a person tag becomes one of them.
NAMES = ("Alex", "Avery", "Bailey", "Blake", "Cameron", "Casey", "Charlie", "Dakota", "Drew", "Eden", "Emerson",
         "Finley", "Frankie", "Harper", "Hayden", "Jamie", "Jesse", "Jordan", "Kai", "Kendall", "Kerry", "Logan",
         "Morgan", "Parker", "Pat", "Peyton", "Quinn", "Reese", "Riley", "Robin", "Rowan", "Sage", "Skyler",
         "Taylor")


def object_words(names: list[str], annot_id: str) -> list[str]:
    """The word for each object of an image in one question's text: people get a name drawn
    with a seed of the question's id (the same draw everywhere, every epoch), others their class."""
    rng = random.Random(zlib.crc32(str(annot_id).encode()))
    return [rng.choice(NAMES) if name == "person" else name for name in names]


def vcr_text(tokens: list, words: list[str]) -> str:
    """A VCR token list (words, and lists of object indices) as text, each tag as its objects' words."""
    out = []
    for token in tokens:
        if isinstance(token, list):
            if not all(isinstance(i, int) and 0 <= i < len(words) for i in token):
                raise ValueError(f"object tag {token} points past the image's {len(words)} objects")
            out += [words[i] for i in token]
        elif isinstance(token, str):
            out.append(token)
        else:
            raise ValueError(f"token {token!r:.40} is neither a word nor an object tag")
    return " ".join(out)


def check_question(q) -> None:
    """ValueError naming what is wrong with a question record of a VCR shard."""
    if not isinstance(q, dict):
        raise ValueError(f"a question is {type(q).__name__}, not a record")
    for field in ("question", "answer_choices", "rationale_choices"):
        if not isinstance(q.get(field), list):
            raise ValueError(f"question {q.get('annot_id')}: {field} is not a token list")
    for field in ("answer_choices", "rationale_choices"):
        if len(q[field]) != CHOICES:
            raise ValueError(f"question {q.get('annot_id')}: {len(q[field])} {field}, not {CHOICES}")
    for field in ("answer_label", "rationale_label"):
        if field in q and q[field] not in range(CHOICES):
            raise ValueError(f"question {q.get('annot_id')}: {field} {q[field]!r:.20} is not 0-{CHOICES - 1}")


@dataclass
class VCROptions:
    max_answer_tokens: int = 60  # Q->A sequences, [CLS] and both [SEP]s included
    max_rationale_tokens: int = 80  # QA->R sequences
    max_regions: int = 100  # detector + ground-truth regions per image (the IMG token comes on top)


class VCR(Task):
    name = "vcr"
    options_class = VCROptions
    train_metric = "accuracy"
    val_metric = "q_ar"
    head = "pair_logits"

    def __init__(self, options: VCROptions, index: ShardIndex, tokenizer_path: str | None = None):
        super().__init__(options, index)
        tokenizer = load_tokenizer(tokenizer_path)
        self.tokenizers = {Q_A: CaptionTokenizer(tokenizer, max_length=options.max_answer_tokens),
                           QA_R: CaptionTokenizer(tokenizer, max_length=options.max_rationale_tokens)}

    def _regions(self, sample: dict) -> dict:
        """The image's regions as the task reads them: every ground-truth box (up to
        max_regions), and the detector's first ones in the room left, detector's first."""
        gt = int(sample["meta"].get("gt_regions", 0))
        detector = len(sample["boxes"]) - gt
        keep_gt = min(gt, self.options.max_regions)
        keep = np.r_[0:min(detector, self.options.max_regions - keep_gt), detector:detector + keep_gt]
        image = {k: sample[k] for k in ("image_w", "image_h")}
        if len(keep) == len(sample["boxes"]):
            return {**image, "features": sample["features"], "boxes": sample["boxes"]}
        return {**image, "features": sample["features"][keep], "boxes": sample["boxes"][keep]}

    def examples(self, sample: dict) -> list[dict]:
        """Per question its Q->A example and its QA->R example(s), sharing the image's
        regions; ValueError (the sample is skipped and counted) for a malformed record."""
        meta = sample["meta"]
        for q in meta["questions"]:
            check_question(q)
        image, examples = self._regions(sample), []
        for q in meta["questions"]:
            words = object_words(meta.get("names", []), q["annot_id"])
            question = vcr_text(q["question"], words)
            answers = [vcr_text(a, words) for a in q["answer_choices"]]
            rationales = [vcr_text(r, words) for r in q["rationale_choices"]]
            ids = {"annot_id": q["annot_id"]}
            examples.append({**image, **ids, "kind": Q_A, "given": None, "firsts": [question] * CHOICES,
                             "seconds": answers, "label": q.get("answer_label", -1)})
            givens = [q["answer_label"]] if "answer_label" in q else range(CHOICES)
            examples += [{**image, **ids, "kind": QA_R, "given": given,
                          "firsts": [f"{question} [SEP] {answers[given]}"] * CHOICES, "seconds": rationales,
                          "label": q.get("rationale_label", -1)} for given in givens]
        return examples

    def collate(self, examples: list[dict]) -> TaskBatch:
        rows = {}
        for kind in (Q_A, QA_R):
            mine = [e for e in examples if e["kind"] == kind]
            if mine:
                rows[kind] = self.tokenizers[kind].pairs([t for e in mine for t in e["firsts"]],
                                                         [t for e in mine for t in e["seconds"]])
        width = max(r[0].shape[1] for r in rows.values())
        where = {kind: iter(range(len(r[0]) // CHOICES)) for kind, r in rows.items()}
        text = [torch.zeros(len(examples) * CHOICES, width, dtype=torch.long) for _ in range(3)]
        for i, e in enumerate(examples):  # back into the examples' order, 4 rows each
            j = next(where[e["kind"]])
            for tensor, part in zip(text, rows[e["kind"]]):
                tensor[i * CHOICES:(i + 1) * CHOICES, :part.shape[1]] = part[j * CHOICES:(j + 1) * CHOICES]
        input_ids, attention_mask, token_type_ids = text
        features, locations, region_mask, _ = lay_out_regions(examples, self.options.max_regions)
        inputs = dict(input_ids=input_ids, token_type_ids=token_type_ids, attention_mask=attention_mask,
                      region_features=features, region_locations=locations, region_mask=region_mask)
        records = [{k: e[k] for k in ("annot_id", "kind", "given", "label")} for e in examples]
        return TaskBatch(inputs, {"labels": torch.tensor([max(e["label"], 0) for e in examples])}, records,
                         int(attention_mask.sum()), torch.arange(len(examples)).repeat_interleave(CHOICES))

    @staticmethod
    def _scores(out, batch: TaskBatch) -> torch.Tensor:
        return out.pair_logits.float().view(len(batch), CHOICES)

    def loss_and_metric(self, out, batch: TaskBatch) -> tuple[torch.Tensor, torch.Tensor]:
        scores, labels = self._scores(out, batch), batch.targets["labels"]
        return F.cross_entropy(scores, labels), (scores.detach().argmax(1) == labels).float().mean()

    def predict(self, out, batch: TaskBatch) -> torch.Tensor:
        """[B, 4]: each choice's score (the results file gives their softmax)."""
        return self._scores(out, batch)

    def evaluate(self, records: list[tuple[dict, list[float]]]) -> dict[str, float]:
        right = defaultdict(dict)  # annot_id -> kind -> the argmax is the label
        for example, scores in records:
            if example["label"] >= 0:
                right[example["annot_id"]][example["kind"]] = int(np.argmax(scores)) == example["label"]
        if not right:
            return {}
        # A labelled question always has both examples: its Q->A and its QA->R (given the right answer).
        return {Q_A: float(np.mean([r[Q_A] for r in right.values()])),
                QA_R: float(np.mean([r[QA_R] for r in right.values()])),
                "q_ar": float(np.mean([r[Q_A] and r[QA_R] for r in right.values()])), "questions": float(len(right))}

    def results(self, records: list[tuple[dict, list[float]]]) -> list[dict]:
        """Per question: the answers' probabilities, and the rationales' given each answer the
        QA->R examples were asked with (the right one; every one on the test split)."""
        out = defaultdict(lambda: {"answer_probs": None, "rationale_probs": {}})
        for example, scores in records:
            probs = torch.tensor(scores).softmax(0).tolist()
            entry = out[example["annot_id"]]
            if example["kind"] == Q_A:
                entry["answer_probs"] = probs
            else:
                entry["rationale_probs"][str(example["given"])] = probs
        return [{"annot_id": annot_id, **entry} for annot_id, entry in out.items()]


TASK = VCR
