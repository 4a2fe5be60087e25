"""The ablation file (cells, what goes to pretraining and to fine-tuning, the jobs and their
order) and `vilbert compare`'s tables on hand-built outcomes."""

import pytest
import yaml

from vilbert.ablation.compare import FAILED, FINISHED, MISSING, Outcome, summary, tables
from vilbert.ablation.jobs import PRETRAIN, describe, plan
from vilbert.ablation.spec import Cell, load_ablation
from vilbert.config_schema import ConfigError


def _file(tmp_path, **spec):
    path = tmp_path / "grid.yaml"
    vqa = {"config": "configs/toy_vqa.yaml", "overrides": {"optim.steps": 5}}
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out"), "pretrain": {"config": "configs/toy.yaml"},
                                    "tasks": {"vqa": vqa}, **spec}, sort_keys=False))
    return path


def test_cells_are_the_listed_cells_times_the_product_of_the_axes(tmp_path):
    ablation = load_ablation(_file(tmp_path, cells=[{"model.preset": "depth2"}, {"model.preset": "depth4"}],
                                   axes={"data.fraction": [0, 0.5], "seed": [0, 1]}))
    assert ablation.name == "grid" and len(ablation.cells) == 8
    assert ablation.cells[0].name == "preset=depth2,fraction=0,seed=0"
    assert ablation.varied() == ["model.preset", "data.fraction"]  # seed is averaged, not an axis
    assert ablation.reference.values == {"model.preset": "depth2", "data.fraction": 0.5, "seed": 0}  # pretrains


def test_fraction_zero_has_no_pretraining_and_model_keys_and_seed_reach_the_fine_tunes(tmp_path):
    ablation = load_ablation(_file(tmp_path, axes={"model.arch": ["single_stream"], "data.fraction": [0, 0.25],
                                                   "seed": [3]}))
    jobs = plan(ablation)
    assert [(job.cell.name, job.stage) for job in jobs] == [
        ("arch=single_stream,fraction=0,seed=3", "vqa"), ("arch=single_stream,fraction=0.25,seed=3", PRETRAIN),
        ("arch=single_stream,fraction=0.25,seed=3", "vqa")]
    scratch, pretraining, finetune = jobs
    assert finetune.needs is pretraining and scratch.needs is None
    assert pretraining.args[:3] == ["pretrain", "--config", "configs/toy.yaml"]
    assert {"model.arch=single_stream", "data.fraction=0.25", "seed=3", "data.seed=3"} <= set(pretraining.args)
    assert {"model.arch=single_stream", "seed=3", "data.seed=3", "optim.steps=5",
            f"model.init={pretraining.run_dir / 'model'}"} <= set(finetune.args)
    assert not any(a.startswith("data.fraction") for a in finetune.args)  # the task's data is whole
    assert "model.init=" in scratch.args  # the paper's no-pretraining baseline
    tracking = finetune.tracking_args(ablation, "PARENT")
    assert "tracking.parent_run_id=PARENT" in tracking and f"tracking.uri={ablation.uri}" in tracking
    assert finetune.start_args() == ["--overwrite"] and not finetune.done()
    # a job stopped part way resumes from its checkpoint; one that exported its model is done
    from vilbert.train import checkpoint

    (pretraining.run_dir / "checkpoints" / checkpoint.tag_for(300)).mkdir(parents=True)
    (pretraining.run_dir / "checkpoints" / checkpoint.tag_for(300) / checkpoint.MARKER).write_text("{}")
    assert pretraining.start_args() == ["--resume", "auto"] and not pretraining.done()
    (pretraining.run_dir / "model").mkdir()
    (pretraining.run_dir / "model" / "config.json").write_text("{}")
    assert pretraining.done() and "done" in describe([pretraining]) and "to run" in describe([finetune])


@pytest.mark.parametrize("spec, message", [
    ({"axes": {"seed": [0, 0]}}, "cells repeat"),
    ({"axes": {"data.fraction": [1.5]}}, r"data.fraction must be in \[0, 1\]"),
    ({"axes": {"seed": []}}, "axes.seed must be a non-empty list"),
    ({"cells": {"a": 1}}, "cells must be a list of mappings"),
    ({"grid": {}}, r"unknown keys \['grid'\]")])
def test_a_bad_ablation_file_names_what_is_wrong(tmp_path, spec, message):
    with pytest.raises(ConfigError, match=message):
        load_ablation(_file(tmp_path, **spec))


def test_summaries_average_seeds_and_never_turn_a_failure_into_a_number():
    cell = Cell({"seed": 0})
    assert summary([Outcome(cell, "vqa", FINISHED, 0.5), Outcome(cell, "vqa", FINISHED, 0.7)]) == "0.600 ± 0.100 (2)"
    assert summary([Outcome(cell, "vqa", FINISHED, 0.5), Outcome(cell, "vqa", FAILED)]) == "0.500 (1 failed)"
    assert summary([Outcome(cell, "vqa", MISSING)]) == "1 missing"
    assert summary([]) == "-"


def test_table1_pairs_each_architecture_with_and_without_pretraining():
    record = {"name": "t", "tasks": ["vqa"], "varied": ["model.arch", "data.fraction"],
              "reference": {"model.arch": "vilbert", "data.fraction": 1.0},
              "cells": [{"model.arch": a, "data.fraction": f, "seed": s}
                        for a in ("vilbert", "single_stream") for f in (0, 1.0) for s in (0, 1)]}
    score = {("vilbert", 0): 0.5, ("vilbert", 1.0): 0.7, ("single_stream", 0): 0.4, ("single_stream", 1.0): 0.6}
    outcomes = [Outcome(Cell(v), "vqa", FINISHED, score[v["model.arch"], v["data.fraction"]] + 0.01 * v["seed"])
                for v in record["cells"]]
    outcomes[-1] = Outcome(outcomes[-1].cell, "vqa", FAILED)  # single_stream, pretrained, seed 1
    table1 = tables(record, outcomes).split("## Table 1")[1].split("##")[0]
    assert "| vilbert | no | 0.505 ± 0.005 (2) |" in table1 and "| vilbert | yes | 0.705 ± 0.005 (2) |" in table1
    assert "| single_stream | no | 0.405 ± 0.005 (2) |" in table1
    assert "| single_stream | yes | 0.600 (1 failed) |" in table1


def test_the_depth_axis_orders_presets_by_their_co_attention_layers():
    record = {"name": "t", "tasks": ["vqa"], "varied": ["model.preset"], "reference": {"model.preset": "small"},
              "cells": [{"model.preset": p} for p in ("small", "small_depth1", "small_depth4")]}
    outcomes = [Outcome(Cell(v), "vqa", FINISHED, 0.1 * (i + 1)) for i, v in enumerate(record["cells"])]
    rows = tables(record, outcomes).split("## vs model.preset")[1].splitlines()[4:7]
    assert rows == ["| small_depth1 (1 co-attention) | 0.200 |", "| small (2 co-attention) | 0.100 |",
                    "| small_depth4 (4 co-attention) | 0.300 |"]
