"""The synthetic tasks: seeded, distinct prompts, answers that follow from the prompt, and held-out
splits that share no name, value or template with training."""
from __future__ import annotations

import json
import re

import pytest

from loramux.tasks import SPLITS, TASKS, Pools, get_task, is_correct, normalize
from loramux.tasks import dates, json_extract, reverse, sql


def test_four_tasks_registered():
    assert set(TASKS) >= {"json", "sql", "reverse", "date"}
    with pytest.raises(KeyError, match="unknown task 'nope'"):
        get_task("nope")


@pytest.mark.parametrize("name", sorted(TASKS))
@pytest.mark.parametrize("split", SPLITS)
def test_examples_are_seeded_and_distinct(name, split):
    task = TASKS[name]
    a = task.examples(split, 120, seed=3)
    assert a == task.examples(split, 120, seed=3)
    assert a != task.examples(split, 120, seed=4)
    assert len({e.prompt for e in a}) == 120
    assert all(e.task == name and e.answer and e.prompt for e in a)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_heldout_prompts_never_occur_in_training(name):
    task = TASKS[name]
    train = {e.prompt for e in task.examples("train", 2000, seed=0)}
    heldout = {e.prompt for e in task.examples("heldout", 100, seed=0)}
    assert not train & heldout


@pytest.mark.parametrize("name", sorted(TASKS))
def test_pools_are_disjoint(name):
    for pools in TASKS[name].pools:
        assert not set(pools.train) & set(pools.heldout)


def test_pools_reject_overlap_and_bad_split():
    with pytest.raises(ValueError, match="share"):
        Pools(("a", "b"), ("b",))
    with pytest.raises(ValueError, match="split 'test'"):
        Pools(("a",), ("b",)).of("test")


def test_json_answers_parse_and_match_the_sentence():
    for e in json_extract.TASK.examples("heldout", 100):
        record = json.loads(e.answer)
        assert list(record) == ["name", "age", "city"] and isinstance(record["age"], int)
        assert record["name"] in e.prompt and str(record["age"]) in e.prompt and record["city"] in e.prompt
        assert record["name"] in json_extract.NAMES.heldout and record["city"] in json_extract.CITIES.heldout


def test_sql_answers_run_on_the_schema():
    import sqlite3

    db = sqlite3.connect(":memory:")
    db.execute("CREATE TABLE employees (name TEXT, department TEXT, city TEXT, salary INTEGER, age INTEGER)")
    db.execute("INSERT INTO employees VALUES ('Ann', 'Sales', 'Paris', 50000, 30)")
    for split in SPLITS:
        for e in sql.TASK.examples(split, 100):
            db.execute(e.answer).fetchall()  # valid SQLite over the fixed schema
    heldout_questions = set(sql.QUESTIONS.heldout)
    assert len(heldout_questions) >= len(sql.INTENTS)


def test_reverse_answer_is_the_words_backwards():
    for e in reverse.TASK.examples("heldout", 100):
        words = e.prompt.split(": ", 1)[1].split()
        assert e.answer.split() == words[::-1]
        assert set(words) <= set(reverse.WORDS.heldout)


def test_date_answer_is_iso_and_matches_the_text():
    for e in dates.TASK.examples("heldout", 100):
        year, month, day = map(int, re.fullmatch(r"(\d{4})-(\d{2})-(\d{2})", e.answer).groups())
        assert str(year) in e.prompt and dates.MONTHS[month - 1][:3] in e.prompt
        assert year in dates.YEARS.heldout
    assert [dates.ordinal(d) for d in (1, 2, 3, 4, 11, 12, 13, 21, 22, 23, 31)] == \
        ["1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd", "23rd", "31st"]


def test_exact_match_normalizes_whitespace_only():
    assert normalize("  a \n b\t c ") == "a b c"
    assert is_correct('{"name": "A",\n "age": 3}', '{"name": "A", "age": 3}')
    assert not is_correct('{"name":"A"}', '{"name": "A"}')
    assert not is_correct("a b", "A B")


@pytest.mark.parametrize("name, pools", [("json", json_extract.NAMES), ("json", json_extract.CITIES),
                                         ("sql", sql.DEPARTMENTS), ("sql", sql.CITIES), ("reverse", reverse.WORDS)])
def test_no_heldout_value_appears_in_any_training_prompt(name, pools):
    train_text = " ".join(e.prompt for e in TASKS[name].examples("train", 1000, seed=0))
    words = set(re.findall(r"[A-Za-z]+", train_text))
    assert not {w for v in pools.heldout for w in v.split() if len(w) > 3} & words


def test_training_values_are_partly_invented_words():
    from loramux.tasks.core import invent_word

    import random

    rng = random.Random(0)
    invented = [invent_word(rng, avoid=json_extract.CITIES.heldout) for _ in range(200)]
    assert len(set(invented)) > 150 and all(w[0].isupper() and w.isalpha() for w in invented)
    names = [json.loads(e.answer)["name"] for e in json_extract.TASK.examples("train", 400)]
    share = sum(n not in json_extract.NAMES.train for n in names) / len(names)
    assert 0.3 < share < 0.7
