import json

import pytest

from taskfed.data.loaders import load_feddpa, load_json
from taskfed.data.records import Record
from taskfed.data.scenarios import partition
from taskfed.errors import TaskfedError
from taskfed.run import load_records
from tests.conftest import tiny_config


def test_feddpa_loader_reads_eight_tasks(flan_path):
    train, test = load_feddpa(flan_path)
    assert len(train) == 2400 and len(test) == 1600
    assert len({r.task for r in train}) == 8
    assert all(isinstance(r, Record) and r.instruction and r.output for r in train[:50])


def _records(tasks=("a", "b", "c", "d"), n=10):
    return [Record(f"{t} question {i}", f"{t} answer {i}", t, "cat") for t in tasks for i in range(n)]


def test_dual_follows_fedrouter_rule_and_pairs_share_no_rows():
    records = _records()
    parts = partition(records, "dual", 4, seed=0)
    by_task = {t: [r for r in records if r.task == t] for t in "abcd"}
    for i, rows in enumerate(parts):
        t, nxt = "abcd"[i], "abcd"[(i + 1) % 4]
        assert rows == by_task[t][:5] + by_task[nxt][5:]  # first half of t, second half of t+1
    for i in range(4):
        for j in range(i + 1, 4):
            assert not set(parts[i]) & set(parts[j])
    assert sorted(r for p in parts for r in p) == sorted(records)  # every row used once


def test_single_gives_one_task_per_client_and_splits_tasks_between_clients():
    parts = partition(_records(), "single", 8, seed=0)
    assert [sorted({r.task for r in p}) for p in parts] == [[t] for t in "abcd"] * 2
    assert not set(parts[0]) & set(parts[4]) and len(parts[0]) == len(parts[4]) == 5


def test_iid_gives_every_client_every_task():
    parts = partition(_records(), "iid", 3, seed=1)
    assert all({r.task for r in p} == set("abcd") for p in parts)
    assert sum(len(p) for p in parts) == 40


def test_dirichlet_is_seeded_and_uses_every_row_once():
    a = partition(_records(n=50), "dirichlet", 5, seed=3, alpha=0.5)
    b = partition(_records(n=50), "dirichlet", 5, seed=3, alpha=0.5)
    c = partition(_records(n=50), "dirichlet", 5, seed=4, alpha=0.5)
    assert a == b and a != c
    assert sorted(r for p in a for r in p) == sorted(_records(n=50))
    sizes = [[sum(r.task == t for r in p) for p in a] for t in "abcd"]
    assert any(max(s) > 2 * min(s) for s in sizes)  # skewed, not uniform


def test_scenario_errors_name_the_problem():
    with pytest.raises(TaskfedError, match="unknown scenario 'nope'"):
        partition(_records(), "nope", 4, seed=0)
    with pytest.raises(TaskfedError, match="multiple of the 4 tasks"):
        partition(_records(), "dual", 3, seed=0)
    with pytest.raises(TaskfedError, match="20 clients but only 8 training rows"):
        partition(_records(n=2), "iid", 20, seed=0)
    with pytest.raises(TaskfedError, match="client .* got no training rows"):
        partition(_records(n=2), "dirichlet", 7, seed=0)


def test_json_loader_errors_name_file_and_row(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"instruction": "x", "output": "y", "task": "t"}, {"instruction": "x", "task": "t"}]')
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"instruction": "x", "output": "y", "task": "t"}) + "\n")
    with pytest.raises(TaskfedError, match=r"bad.json, row 1: missing field 'output'"):
        load_json(bad, good)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"instruction": "x", "output": "y", "task": "t"}\n{not json\n')
    with pytest.raises(TaskfedError, match=r"broken.jsonl, line 2: malformed JSON"):
        load_json(good, broken)
    with pytest.raises(TaskfedError, match="does not exist"):
        load_json(tmp_path / "missing.json", good)


def test_unknown_task_in_config_is_named():
    with pytest.raises(TaskfedError, match="data.unseen_tasks: unknown task 'nope'"):
        load_records(tiny_config("data.unseen_tasks=['nope']"))


def test_unseen_tasks_are_held_out_of_training(tiny_runtime_factory):
    from taskfed.run import Experiment

    cfg = tiny_config("scenario.name=iid", "scenario.n_clients=2", "data.unseen_tasks=['wic', 'trec']",
                      "eval.modes=['unseen']")
    exp = Experiment(cfg, rt=tiny_runtime_factory(cfg))
    trained_tasks = {r.task for c in exp.clients.values() for r in c.records}
    assert "wic" not in trained_tasks and "trec" not in trained_tasks and len(trained_tasks) == 6
    assert set(exp.unseen) == {"wic", "trec"} and exp.test_by_task["wic"]
