"""VQA 2.0 task shards from the public files: the questions and annotations JSON of
visualqa.org and the images' detector features (bottom-up TSV, or per-image .npz/.npy).

Each sample is one image: its features and boxes once, and every question asked about it
in `meta["questions"]` (question_id, question, the 10 human answers, answer_type,
question_type), so a question costs its text and answers, not a copy of the features. The
pipeline unpacks the questions into examples (`vilbert.tasks.vqa`).

The splits of the paper's recipe (multi-task `vqa_dataset.py`): `trainval` = train + val
without its last 3,000 questions (by question id), `minival` = those 3,000; test-dev and
test-std files (questions only) become sets of their own. Every set's index carries the same
answer vocabulary, built from the train+val annotations (`build_answer_vocabulary`).
"""

from __future__ import annotations

import json
from pathlib import Path

from shards.build import ShardOptions
from shards.sources import InputError
from shards.task_sets import TaskSets, write_task_sets
from vilbert.tasks.vqa import MIN_ANSWER_COUNT, build_answer_vocabulary

MINIVAL_QUESTIONS = 3000
ANSWERED_SPLITS = ("train", "val")  # the splits whose annotations build the vocabulary


FIELD_TYPES = {  # what each field of the official files must be: (types, in words)
    "question_id": ((int,), "an integer"), "image_id": ((int, str), "an integer or a string"),
    "question": ((str,), "a string"), "answers": ((list,), "a list"), "answer_type": ((str,), "a string"),
    "question_type": ((str,), "a string"), "multiple_choice_answer": ((str,), "a string"),
}


def _records(path: str | Path, key: str, fields: tuple[str, ...]) -> list[dict]:
    """The `key` list of an official JSON file, each record checked for `fields` and their types."""
    try:
        records = json.loads(Path(path).read_text())[key]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise InputError(f"{path}: not a VQA {key} file ({type(e).__name__}: {e})") from None
    for number, record in enumerate(records if isinstance(records, list) else [None]):
        if not isinstance(record, dict) or not all(f in record for f in fields):
            raise InputError(f"{path}: {key}[{number}] ({str(record)[:80]}) lacks one of {', '.join(fields)}")
        for field in fields:
            types, words = FIELD_TYPES[field]
            if not isinstance(record[field], types) or isinstance(record[field], bool):
                raise InputError(f"{path}: {key}[{number}]: {field} is {str(record[field])[:40]!r}, not {words}")
    return records


def read_questions(questions_path: str | Path, annotations_path: str | Path | None = None) -> list[dict]:
    """Question records (`question_id`, `image_id`, `question`), joined with their
    annotation (`answers` as 10 strings, `answer_type`, `question_type`,
    `multiple_choice_answer`) when an annotations file is given."""
    questions = _records(questions_path, "questions", ("question_id", "image_id", "question"))
    if annotations_path is None:
        return questions
    annotations = {a["question_id"]: a for a in _records(
        annotations_path, "annotations", ("question_id", "answers", "answer_type", "question_type",
                                          "multiple_choice_answer"))}
    missing = [q["question_id"] for q in questions if q["question_id"] not in annotations]
    if missing:
        raise InputError(f"{annotations_path} has no annotation for {len(missing)} questions of {questions_path} "
                         f"(e.g. question_id {missing[0]}): are they the same split?")
    joined = []
    for q in questions:
        a = annotations[q["question_id"]]
        if not isinstance(a["answers"], list) or not all(isinstance(x, dict) and isinstance(x.get("answer"), str)
                                                         for x in a["answers"]):
            raise InputError(f"{annotations_path}: question_id {q['question_id']}: answers are not "
                             "[{answer: str, ...}]")
        joined.append({**q, "answers": [x["answer"] for x in a["answers"]], "answer_type": a["answer_type"],
                       "question_type": a["question_type"], "multiple_choice_answer": a["multiple_choice_answer"]})
    return joined


def recipe_sets(splits: dict[str, list[dict]], minival: int = MINIVAL_QUESTIONS) -> dict[str, list[dict]]:
    """The shard sets to write: with `minival` > 0 and both train and val, `trainval` and
    `minival` as the paper's recipe; every other split as it is."""
    sets = dict(splits)
    if minival > 0 and all(s in splits for s in ANSWERED_SPLITS):
        val = sorted(sets.pop("val"), key=lambda q: q["question_id"])
        if minival >= len(val):
            raise ValueError(f"--minival {minival} leaves no val question for trainval (val has {len(val)})")
        sets["trainval"] = sets.pop("train") + val[:-minival]
        sets["minival"] = val[-minival:]
    return sets


VQA_SETS = TaskSets(task="vqa", meta_key="questions",
                    fields=("question_id", "question", "answers", "answer_type", "question_type"),
                    text=lambda q: q["question"], noun="question")


def write_vqa_sets(splits: dict[str, list[dict]], source, out: str | Path, options: ShardOptions, *,
                   minival: int = MINIVAL_QUESTIONS, min_answer_count: int = MIN_ANSWER_COUNT,
                   prepare=lambda record: record, max_regions: int = 100, source_name: str = "",
                   lenient: bool = False) -> dict[str, dict]:
    """Write one shard set per recipe set under `out` (`shards.task_sets.write_task_sets`),
    every index with the answer vocabulary of the train+val annotations; `prepare(record)`:
    box selection."""
    unanswered = [name for name in ANSWERED_SPLITS if splits.get(name) and "answers" not in splits[name][0]]
    if unanswered:
        raise InputError(f"the {' and '.join(unanswered)} questions came without their annotations file: the answer "
                         "vocabulary and the training targets need them")
    answered = [q for name in ANSWERED_SPLITS for q in splits.get(name, [])]
    if not answered:
        raise InputError("the answer vocabulary needs the train and/or val annotations")
    answers = build_answer_vocabulary(answered, min_answer_count)
    return write_task_sets(VQA_SETS, recipe_sets(splits, minival), source, out, options,
                           index_task=lambda name: {"answers": answers},
                           prepare=lambda record, name, key: prepare(record), max_regions=max_regions,
                           source_name=source_name, lenient=lenient)
