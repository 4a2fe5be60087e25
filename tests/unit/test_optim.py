"""The optimizer: the lr schedule across resumes, parameter groups with a fresh lr."""


import pytest
import torch

from vilbert.train.config import OptimConfig
from vilbert.train.optim import retarget_schedule, warmup_linear_decay


# --- the lr schedule across resumes --------------------------------------------------------------
def _lrs(scheduler, steps):
    out = []
    for _ in range(steps):
        scheduler.optimizer.step()
        scheduler.step()
        out.append(scheduler.get_last_lr()[0])
    return out


def _scheduler(steps, state=None):
    optimizer = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=1.0)
    scheduler = warmup_linear_decay(optimizer, OptimConfig(steps=steps, lr=1.0, warmup_fraction=0.1))
    if state is not None:
        scheduler.load_state_dict(state)
    return scheduler


def test_a_resume_with_the_same_steps_continues_the_schedule_exactly():
    whole = _lrs(_scheduler(100), 100)
    first = _scheduler(100)
    before = _lrs(first, 40)
    resumed = _scheduler(100, first.state_dict())  # the checkpoint carries the schedule
    retarget_schedule(resumed, 100, 40)
    assert before + _lrs(resumed, 60) == whole


def test_a_resume_with_more_steps_decays_from_where_it_was_to_the_new_end():
    first = _scheduler(100)
    before = _lrs(first, 40)
    resumed = _scheduler(200, first.state_dict())  # a config asking for 200 steps now
    assert resumed.lr_lambdas[0].total == 100  # the checkpoint's schedule came back with it
    retarget_schedule(resumed, 200, 40)
    after = _lrs(resumed, 160)
    step = before[-1] - before[-2]  # the decay per step before the resume
    assert abs(after[0] - before[-1]) <= abs(step) * 0.6  # no jump: at most a (gentler) decay step
    assert all(b < a for a, b in zip(after, after[1:]))  # decaying ...
    assert after[-1] == 0.0 and after[-2] > 0.0  # ... to zero exactly at the new end
    # resumed inside the warmup: the warmup completes, then the decay ends at the new total
    warm = _scheduler(100)
    _lrs(warm, 5)
    longer = _scheduler(300, warm.state_dict())
    retarget_schedule(longer, 300, 5)
    lrs = _lrs(longer, 295)
    assert max(lrs) == pytest.approx(1.0) and lrs[-1] == 0.0
    # ... unless the new total ends before the warmup would: then it decays from where it was
    shorter = _scheduler(8, warm.state_dict())
    retarget_schedule(shorter, 8, 5)
    assert _lrs(shorter, 3) == pytest.approx([0.6 * 2 / 3, 0.6 / 3, 0.0])  # 0.6 = 6/10 of the warmup


def test_extending_a_finished_schedule_is_refused():
    done = _scheduler(100)
    _lrs(done, 100)
    extended = _scheduler(150, done.state_dict())
    with pytest.raises(ValueError, match="decayed to 0"):
        retarget_schedule(extended, 150, 100)


# --- parameter groups: a higher lr for the parameters that start fresh ------------------------------
def test_fresh_parameters_get_fresh_lr_and_loaded_ones_lr():
    from vilbert import ViLBERTConfig, ViLBERTForPretraining
    from vilbert.train.optim import parameter_groups

    model = ViLBERTForPretraining(ViLBERTConfig.from_preset("tiny"))
    names = dict(model.named_parameters())
    loaded = frozenset(k for k in model.state_dict() if ".text_" in k or k == "heads.mlm.decoder.weight")
    groups = parameter_groups(model, OptimConfig(lr=1e-4, fresh_lr=1e-3, weight_decay=0.01), loaded)
    by_id = {id(p): g for g in groups for p in g["params"]}
    assert len(by_id) == sum(len(g["params"]) for g in groups) == len(names)  # each parameter once
    words = names["vilbert.text_embeddings.word_embeddings.weight"]  # tied to heads.mlm.decoder.weight
    assert by_id[id(words)]["lr"] == 1e-4 and by_id[id(words)]["weight_decay"] == 0.01
    assert by_id[id(names["vilbert.encoder.text_layers.0.attention.query.bias"])]["lr"] == 1e-4
    for name in ("vilbert.region_embeddings.feature.weight", "heads.alignment.weight"):
        assert by_id[id(names[name])]["lr"] == 1e-3, name
    assert by_id[id(names["heads.alignment.bias"])]["weight_decay"] == 0.0
    assert groups[0]["lr"] == 1e-4 and groups[-1]["lr"] == 1e-3  # train/lr and train/fresh_lr read these
    same = parameter_groups(model, OptimConfig(lr=1e-4, fresh_lr=0.0), loaded)
    assert {g["lr"] for g in same} == {1e-4}
