"""VQA 2.0 as the paper fine-tunes it (vilbert_beta `vlbert_tasks.yml`, multi-task `vqa_dataset.py`).

    input:   [CLS] question [SEP] (at most 16 tokens; the multi-task code: 23) and up to 100
             regions + the IMG token
    head:    `ViLBERTForTasks.vqa_head` on h_IMG * h_CLS, one logit per answer of the
             vocabulary: the answers that are some question's `multiple_choice_answer` at
             least 9 times in train+val after normalisation (3,129 answers)
    target:  a soft score per answer from the 10 human answers: 0, 0.3, 0.6, 0.9, 1.0 for
             0, 1, 2, 3, >= 4 of them
    loss:    binary cross-entropy with logits, averaged, times the number of answers (as the
             official code)
    metrics: training: the soft score of the argmax answer; evaluation: the official VQA
             accuracy (`vqa_accuracy`), overall and per answer type

A shard sample is one image with all its questions in `meta["questions"]` (question_id,
question, answers: the 10 human answers, answer_type), so the features are stored once per
image; `examples` unpacks them into one example per question.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vilbert.data.collate import lay_out_regions
from vilbert.data.shard_index import ShardIndex
from vilbert.data.tokenizer import CaptionTokenizer, load_tokenizer
from vilbert.tasks.base import Task, TaskBatch

# --- the official evaluation's answer processing (GT-Vision-Lab/VQA vqaEval.py) ----------
_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                "?", "!"]
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: a look-ahead for "<=digit", so any period not before a digit
_PERIOD_SUBSTITUTIONS = re.UNICODE  # sic: the official call passes re.UNICODE (32) as the count
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
# Its contractions table as written there since 2016 (straight apostrophes; keys with capitals
# never match after lower-casing), one "key value" pair per entry.
_CONTRACTIONS = dict(pair.split(" ") for pair in """\
aint ain't|arent aren't|cant can't|couldve could've|couldnt couldn't|couldn'tve couldn't've|couldnt've couldn't've|\
didnt didn't|doesnt doesn't|dont don't|hadnt hadn't|hadnt've hadn't've|hadn'tve hadn't've|hasnt hasn't|\
havent haven't|hed he'd|hed've he'd've|he'dve he'd've|hes he's|howd how'd|howll how'll|hows how's|Id've I'd've|\
I'dve I'd've|Im I'm|Ive I've|isnt isn't|itd it'd|itd've it'd've|it'dve it'd've|itll it'll|let's let's|\
maam ma'am|mightnt mightn't|mightnt've mightn't've|mightn'tve mightn't've|mightve might've|mustnt mustn't|\
mustve must've|neednt needn't|notve not've|oclock o'clock|oughtnt oughtn't|ow's'at 'ow's'at|'ows'at 'ow's'at|\
'ow'sat 'ow's'at|shant shan't|shed've she'd've|she'dve she'd've|she's she's|shouldve should've|\
shouldnt shouldn't|shouldnt've shouldn't've|shouldn'tve shouldn't've|somebody'd somebodyd|\
somebodyd've somebody'd've|somebody'dve somebody'd've|somebodyll somebody'll|somebodys somebody's|\
someoned someone'd|someoned've someone'd've|someone'dve someone'd've|someonell someone'll|someones someone's|\
somethingd something'd|somethingd've something'd've|something'dve something'd've|somethingll something'll|\
thats that's|thered there'd|thered've there'd've|there'dve there'd've|therere there're|theres there's|\
theyd they'd|theyd've they'd've|they'dve they'd've|theyll they'll|theyre they're|theyve they've|twas 'twas|\
wasnt wasn't|wed've we'd've|we'dve we'd've|weve we've|werent weren't|whatll what'll|whatre what're|\
whats what's|whatve what've|whens when's|whered where'd|wheres where's|whereve where've|whod who'd|\
whod've who'd've|who'dve who'd've|wholl who'll|whos who's|whove who've|whyll why'll|whyre why're|whys why's|\
wont won't|wouldve would've|wouldnt wouldn't|wouldnt've wouldn't've|wouldn'tve wouldn't've|yall y'all|\
yall'll y'all'll|y'allll y'all'll|yall'd've y'all'd've|y'alld've y'all'd've|y'all'dve y'all'd've|youd you'd|\
youd've you'd've|you'dve you'd've|youll you'll|youre you're|youve you've""".split("|"))


def process_punctuation(text: str) -> str:
    """Punctuation marks go (or become spaces when glued between words, unless the text has
    a comma inside a number), then every period that is not before a digit."""
    out = text
    for mark in _PUNCTUATION:
        glued = not (mark + " " in text or " " + mark in text) and _COMMA_IN_NUMBER.search(text) is None
        out = out.replace(mark, " " if glued else "")
    return _PERIOD.sub("", out, _PERIOD_SUBSTITUTIONS)


def process_digit_article(text: str) -> str:
    """Lower case, number words to digits, articles dropped, contractions given apostrophes."""
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


CURRENT, BEFORE_2021 = "2021", "2017"  # versions of the official script: since its 2021 fix, and before it
EVALUATIONS = (CURRENT, BEFORE_2021)


def _whitespace(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def vqa_accuracy(answers: list[str], prediction: str, evaluation: str = CURRENT) -> float:
    """The official VQA accuracy of `prediction` against the human `answers` (10 of them):
    min(#other humans matching / 3, 1) averaged over the leave-one-out subsets.

    The answer processing follows the official script's `evaluation` version. "2021" (its
    current one, "Fixed processing answers bug"): newlines, tabs and outer spaces go from the
    prediction and the answers always; punctuation and digit/article normalisation apply to
    both, and only when the answers are not all the same. "2017" (before that fix): the
    prediction is always fully normalised, the answers only lose punctuation, and only when
    they differ."""
    prediction = _whitespace(prediction)
    if evaluation == CURRENT:
        answers = [_whitespace(a) for a in answers]
        if len(set(answers)) > 1:
            answers = [process_digit_article(process_punctuation(a)) for a in answers]
            prediction = process_digit_article(process_punctuation(prediction))
    elif evaluation == BEFORE_2021:
        prediction = process_digit_article(process_punctuation(prediction))
        if len(set(answers)) > 1:
            answers = [process_punctuation(a) for a in answers]
    else:
        raise ValueError(f"unknown VQA evaluation {evaluation!r}; one of {EVALUATIONS}")
    matches = [a == prediction for a in answers]
    total = sum(matches)
    return sum(min(1.0, (total - own) / 3) for own in matches) / len(answers)


# --- answer vocabulary and soft targets (the official preprocessing) -------------------
SOFT_SCORES = (0.0, 0.3, 0.6, 0.9, 1.0)  # for 0, 1, 2, 3 and >= 4 matching human answers
MIN_ANSWER_COUNT = 9  # train+val questions whose multiple_choice_answer it is (-> 3,129 answers)


def normalise_answer(answer: str) -> str:
    """The form answers take in the vocabulary and the targets."""
    return process_digit_article(process_punctuation(answer)).replace(",", "")


def build_answer_vocabulary(annotations: list[dict], min_count: int = MIN_ANSWER_COUNT) -> list[str]:
    """Answers that are the `multiple_choice_answer` of at least `min_count` questions (VQA
    annotation records), most frequent first (ties alphabetical)."""
    questions = defaultdict(set)
    for entry in annotations:
        questions[normalise_answer(entry["multiple_choice_answer"])].add(entry["question_id"])
    counts = Counter({answer: len(ids) for answer, ids in questions.items() if len(ids) >= min_count})
    return sorted(counts, key=lambda a: (-counts[a], a))


def soft_targets(answers: list[str], answer_index: dict[str, int]) -> list[tuple[int, float]]:
    """(vocabulary index, soft score) of each distinct human answer that is in the vocabulary."""
    counts = Counter(normalise_answer(a) for a in answers)
    return [(answer_index[a], SOFT_SCORES[min(n, 4)]) for a, n in counts.items() if a in answer_index]


# --- the task ----------------------------------------------------------------------------
def check_question(q) -> None:
    """ValueError naming what is wrong with a question record of a VQA shard."""
    if not isinstance(q, dict):
        raise ValueError(f"a question is {type(q).__name__}, not a record")
    if not isinstance(q.get("question_id"), int) or isinstance(q.get("question_id"), bool):
        raise ValueError(f"question_id {q.get('question_id')!r:.40} is not an integer")
    if not isinstance(q.get("question"), str):
        raise ValueError(f"question {q['question_id']}: the question {q.get('question')!r:.40} is not a string")
    answers = q.get("answers", [])
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise ValueError(f"question {q['question_id']}: answers {answers!r:.60} are not a list of strings")


@dataclass
class VQAOptions:
    max_question_tokens: int = 16  # [CLS] and [SEP] included; the multi-task code uses 23
    max_regions: int = 100  # detector regions per image (the IMG token comes on top)
    evaluation: str = CURRENT  # the official script's answer processing: "2021" (current) or "2017"


class VQA(Task):
    name = "vqa"
    options_class = VQAOptions
    train_metric = "score"
    val_metric = "accuracy"
    head = "vqa_logits"

    def __init__(self, options: VQAOptions, index: ShardIndex, tokenizer_path: str | None = None):
        super().__init__(options, index)
        if options.evaluation not in EVALUATIONS:
            raise ValueError(f"task.evaluation={options.evaluation!r}: the official VQA script's version, one of "
                             f"{EVALUATIONS} (2021: the current one)")
        self.answers = list(index.task.get("answers", []))
        if not self.answers:
            raise ValueError("the VQA training shards carry no answer vocabulary (index.json task.answers): write "
                             "them with `python -m shards vqa` or `python -m shards toyvqa`")
        self.answer_index = {a: i for i, a in enumerate(self.answers)}
        self.tokenizer = CaptionTokenizer(load_tokenizer(tokenizer_path), max_length=options.max_question_tokens)

    def model_overrides(self) -> dict:
        return {"num_vqa_answers": len(self.answers), "id2label": dict(enumerate(self.answers))}

    @property
    def metric_version(self) -> str:
        return f"official vqaEval.py, {self.options.evaluation} version"

    def check_split(self, index: ShardIndex, where: str) -> None:
        if index.task.get("answers", self.answers) != self.answers:
            raise ValueError(f"{where}: its answer vocabulary differs from the training shards'; write every split "
                             "in one `python -m shards vqa` run")

    def examples(self, sample: dict) -> list[dict]:
        """One example per question; ValueError (the sample is skipped and counted, as any bad
        sample) for a question record of the wrong shape."""
        for q in sample["meta"]["questions"]:
            check_question(q)
        image = {k: sample[k] for k in ("features", "boxes", "image_w", "image_h")}  # shared, not copied
        return [{**image, "question_id": q["question_id"], "question": q["question"],
                 "answers": q.get("answers", []), "answer_type": q.get("answer_type", ""),
                 "targets": soft_targets(q.get("answers", []), self.answer_index)}
                for q in sample["meta"]["questions"]]

    def collate(self, examples: list[dict]) -> TaskBatch:
        input_ids, attention_mask = self.tokenizer([e["question"] for e in examples])
        features, locations, region_mask, _ = lay_out_regions(examples, self.options.max_regions)
        targets = torch.zeros(len(examples), len(self.answers))
        for i, example in enumerate(examples):
            for answer, score in example["targets"]:
                targets[i, answer] = score
        inputs = dict(input_ids=input_ids, token_type_ids=torch.zeros_like(input_ids), attention_mask=attention_mask,
                      region_features=features, region_locations=locations, region_mask=region_mask)
        records = [{k: e[k] for k in ("question_id", "answers", "answer_type")} for e in examples]
        return TaskBatch(inputs, {"scores": targets}, records, int(attention_mask.sum()))

    def loss_and_metric(self, out, batch: TaskBatch) -> tuple[torch.Tensor, torch.Tensor]:
        logits, scores = out.vqa_logits.float(), batch.targets["scores"]
        loss = F.binary_cross_entropy_with_logits(logits, scores) * scores.shape[1]
        return loss, scores.gather(1, logits.detach().argmax(1, keepdim=True)).mean()

    def predict(self, out, batch: TaskBatch) -> torch.Tensor:
        return out.vqa_logits.argmax(1)

    def evaluate(self, records: list[tuple[dict, int]]) -> dict[str, float]:
        scored = [(example["answer_type"], vqa_accuracy(example["answers"], self.answers[prediction],
                                                             self.options.evaluation))
                  for example, prediction in records if example["answers"]]
        if not scored:
            return {}
        metrics = {"accuracy": sum(a for _, a in scored) / len(scored), "questions": float(len(scored))}
        by_type = defaultdict(list)
        for answer_type, accuracy in scored:
            by_type[answer_type].append(accuracy)
        for answer_type, values in sorted(by_type.items()):
            metrics[f"accuracy/{answer_type.replace('/', '_')}"] = sum(values) / len(values)
        return metrics

    def results(self, records: list[tuple[dict, int]]) -> list[dict]:
        return [{"question_id": example["question_id"], "answer": self.answers[prediction]}
                for example, prediction in records]


TASK = VQA
