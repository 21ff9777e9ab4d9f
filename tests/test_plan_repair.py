"""Plan repair on its own: what ``normalise_plan`` and ``repair_dependencies`` make of a
model's plan. No sockets: plans are built in memory."""

from __future__ import annotations

from typing import Any

import pytest

from apr_graph import AprSettings
from apr_graph.nodes.decompose import normalise_plan, repair_dependencies
from apr_graph.plan import labelled_parts
from apr_graph.plan_schema import Plan
from apr_graph.state import SubtaskRecord

CYCLE_NOTE = "dependencies form a cycle: running the subtasks one after another"


def parallel(*subtasks: dict[str, Any], **fields: Any) -> Plan:
    return Plan.model_validate({"strategy": "parallel", "subtasks": list(subtasks), **fields})


def sub(sid: str, goal: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"id": sid, "goal": f"goal of {sid}" if goal is None else goal, **extra}


def deps(plan: dict[str, Any]) -> dict[str, list[str]]:
    return {s["id"]: s["depends_on"] for s in plan["subtasks"]}


def steps(*pairs: tuple[str, list[str]]) -> list[dict[str, Any]]:
    """Subtasks as ``normalise_plan`` hands them to ``repair_dependencies``."""
    return [{"id": sid, "depends_on": list(wanted)} for sid, wanted in pairs]


# -- direct plans -------------------------------------------------------------------------


def test_direct_plan_ignores_junk_subtasks() -> None:
    plan = Plan.model_validate(
        {"strategy": "direct", "answer": "  4\n", "subtasks": [sub("x", "junk")] * 10}
    )
    assert normalise_plan(plan, AprSettings()) == {
        "strategy": "direct",
        "answer": "4",
        "subtasks": [],
        "merge": None,
        "notes": ["ignored 10 subtasks of a direct plan"],
    }


def test_direct_plan_without_subtasks_has_no_notes() -> None:
    plan = Plan.model_validate({"strategy": "direct", "answer": None})
    result = normalise_plan(plan, AprSettings())
    assert result["answer"] == ""  # no answer yet: the node asks for one
    assert result["notes"] == []


@pytest.mark.parametrize("placeholder", ["...", "\u2026", " - ", "?"])
def test_a_direct_answer_that_is_a_placeholder_is_no_answer(placeholder: str) -> None:
    # The 135M demo model planned {"strategy": "direct", "answer": "..."}: apr printed "...".
    plan = Plan.model_validate({"strategy": "direct", "answer": placeholder})
    result = normalise_plan(plan, AprSettings())
    assert result["answer"] == ""  # the node asks one call for the answer
    assert result["notes"] == [
        f"the planner's answer {placeholder.strip()!r} says nothing: answering by one call"
    ]
    plus = Plan.model_validate({"strategy": "direct", "answer": "+"})
    assert normalise_plan(plus, AprSettings())["answer"] == "+"  # an answer of one symbol


def test_empty_parallel_plan_becomes_direct() -> None:
    result = normalise_plan(parallel(answer="42"), AprSettings())
    assert result == {
        "strategy": "direct",
        "answer": "42",
        "subtasks": [],
        "merge": None,
        "notes": ["parallel plan had no subtasks: answering directly"],
    }


def test_subtasks_without_a_goal_are_dropped() -> None:
    result = normalise_plan(
        parallel(sub("a", "  "), sub("b", "real work"), sub("c", "")), AprSettings()
    )
    assert [(s["id"], s["goal"]) for s in result["subtasks"]] == [("b", "real work")]
    assert result["notes"] == ["dropped 2 subtasks without a goal"]


def test_a_plan_of_only_empty_goals_becomes_direct() -> None:
    result = normalise_plan(parallel(sub("a", " "), sub("b", "")), AprSettings())
    assert result["strategy"] == "direct"
    assert result["notes"] == [
        "dropped 2 subtasks without a goal",
        "parallel plan had no subtasks: answering directly",
    ]


# -- parallel plans: shape, ids, merge ------------------------------------------------------


def test_a_clean_plan_passes_unchanged_with_no_notes() -> None:
    result = normalise_plan(
        parallel(sub("a", " find x "), sub("b", depends_on=["a"]), merge="vote"), AprSettings()
    )
    assert result == {
        "strategy": "parallel",
        "answer": None,
        "subtasks": [
            {"id": "a", "goal": "find x", "depends_on": [], "fork": False, "max_tokens": None},
            {
                "id": "b",
                "goal": "goal of b",
                "depends_on": ["a"],
                "fork": False,
                "max_tokens": None,
            },
        ],
        "merge": "vote",
        "notes": [],
    }


def test_duplicate_and_empty_ids_are_renamed_by_position() -> None:
    subtasks = sub("a", "one"), sub("a", "two"), sub("", "three"), sub("x/y", "four")
    result = normalise_plan(parallel(*subtasks), AprSettings())
    assert [s["id"] for s in result["subtasks"]] == ["a", "s2", "s3", "x-y"]
    assert result["notes"] == []


def test_a_renamed_id_that_is_taken_gets_a_prime() -> None:
    subtasks = sub("s2", "one"), sub("s2", "two"), sub("s2", "three")
    result = normalise_plan(parallel(*subtasks), AprSettings())
    assert [s["id"] for s in result["subtasks"]] == ["s2", "s2'", "s3"]


@pytest.mark.parametrize(
    ("settings_merge", "plan_merge", "expected"),
    [(None, None, "synthesize"), (None, "race", "race"), ("vote", "race", "vote")],
)
def test_settings_merge_wins_over_the_plan_and_synthesize_is_the_default(
    settings_merge: Any, plan_merge: str | None, expected: str
) -> None:
    result = normalise_plan(parallel(sub("a"), merge=plan_merge), AprSettings(merge=settings_merge))
    assert result["merge"] == expected


# -- clamping -------------------------------------------------------------------------------


def test_clamped_to_max_threads_with_a_note() -> None:
    plan = parallel(*(sub(f"s{i}") for i in range(1, 8)))
    result = normalise_plan(plan, AprSettings(max_threads=3))
    assert [s["id"] for s in result["subtasks"]] == ["s1", "s2", "s3"]
    assert result["notes"] == ["clamped 7 subtasks to 3 (max_threads)"]


def test_clamped_to_the_slots_left_in_the_run() -> None:
    plan = parallel(*(sub(f"s{i}") for i in range(1, 8)))
    result = normalise_plan(plan, AprSettings(max_threads=5), slots=2)
    assert [s["id"] for s in result["subtasks"]] == ["s1", "s2"]
    assert result["notes"] == ["clamped 7 subtasks to 2 (max_total_threads)"]


def test_more_slots_than_max_threads_clamps_to_max_threads() -> None:
    plan = parallel(*(sub(f"s{i}") for i in range(1, 8)))
    result = normalise_plan(plan, AprSettings(max_threads=4), slots=100)
    assert len(result["subtasks"]) == 4
    assert result["notes"] == ["clamped 7 subtasks to 4 (max_threads)"]


def test_no_slot_left_answers_directly() -> None:
    result = normalise_plan(parallel(sub("a"), sub("b"), answer="fallback"), AprSettings(), slots=0)
    assert result["strategy"] == "direct"
    assert result["answer"] == "fallback"
    assert result["notes"] == [
        "clamped 2 subtasks to 0 (max_total_threads)",
        "parallel plan had no subtasks: answering directly",
    ]


def test_dependencies_on_clamped_subtasks_are_dropped() -> None:
    plan = parallel(sub("s1"), sub("s2", depends_on=["s1", "s4"]), sub("s3"), sub("s4"))
    result = normalise_plan(plan, AprSettings(max_threads=3))
    assert deps(result) == {"s1": [], "s2": ["s1"], "s3": []}
    assert result["notes"] == [
        "clamped 4 subtasks to 3 (max_threads)",
        "s2: ignored unknown or self dependencies ['s4']",
    ]


# -- dependencies ---------------------------------------------------------------------------


def test_unknown_and_self_dependencies_are_dropped() -> None:
    subtasks = steps(("a", []), ("b", ["a", "b", "ghost"]), ("c", ["a"]))
    notes: list[str] = []
    repair_dependencies(subtasks, notes)
    assert {s["id"]: s["depends_on"] for s in subtasks} == {"a": [], "b": ["a"], "c": ["a"]}
    assert notes == ["b: ignored unknown or self dependencies ['b', 'ghost']"]


def test_repeated_dependencies_are_kept_once() -> None:
    subtasks = steps(("a", []), ("b", ["a", "a"]))
    repair_dependencies(subtasks, [])
    assert subtasks[1]["depends_on"] == ["a"]


def test_a_self_loop_alone_is_no_cycle() -> None:
    subtasks = steps(("a", ["a"]), ("b", []))
    notes: list[str] = []
    repair_dependencies(subtasks, notes)
    assert [s["depends_on"] for s in subtasks] == [[], []]  # not chained: still parallel
    assert CYCLE_NOTE not in notes


def test_a_diamond_is_not_a_cycle() -> None:
    subtasks = steps(("a", []), ("b", ["a"]), ("c", ["a"]), ("d", ["b", "c"]))
    notes: list[str] = []
    repair_dependencies(subtasks, notes)
    assert {s["id"]: s["depends_on"] for s in subtasks} == {
        "a": [],
        "b": ["a"],
        "c": ["a"],
        "d": ["b", "c"],
    }
    assert notes == []


@pytest.mark.parametrize(
    "pairs",
    [
        (("s1", ["s2"]), ("s2", ["s1"]), ("s3", [])),  # two-step cycle, one bystander
        (("s1", ["s3"]), ("s2", ["s1"]), ("s3", ["s2"])),  # three-step cycle
        (("s1", []), ("s2", ["s3"]), ("s3", ["s2"])),  # the cycle is not at the start
    ],
)
def test_a_cycle_turns_the_whole_plan_into_a_chain(
    pairs: tuple[tuple[str, list[str]], ...],
) -> None:
    subtasks = steps(*pairs)
    notes: list[str] = []
    repair_dependencies(subtasks, notes)
    assert [s["depends_on"] for s in subtasks] == [[], ["s1"], ["s2"]]
    assert notes == [CYCLE_NOTE]


def test_cycles_are_chained_in_plan_order_through_normalise_plan() -> None:
    plan = parallel(
        sub("x", depends_on=["y"]), sub("y", depends_on=["x"]), sub("z", depends_on=["nope"])
    )
    result = normalise_plan(plan, AprSettings())
    assert deps(result) == {"x": [], "y": ["x"], "z": ["y"]}
    assert result["notes"] == ["z: ignored unknown or self dependencies ['nope']", CYCLE_NOTE]


# -- forks and token allowances -------------------------------------------------------------


def test_fork_is_cleared_at_the_depth_limit() -> None:
    plan = parallel(sub("a", fork=True), sub("b"))
    settings = AprSettings(max_depth=3)
    below = normalise_plan(plan, settings, depth=1)
    assert [s["fork"] for s in below["subtasks"]] == [True, False]
    assert below["notes"] == []
    at_limit = normalise_plan(plan, settings, depth=2)
    assert [s["fork"] for s in at_limit["subtasks"]] == [False, False]
    assert at_limit["notes"] == ["max_depth=3 reached: subtasks will not fork again"]


def test_max_depth_one_never_forks() -> None:
    result = normalise_plan(parallel(sub("a", fork=True)), AprSettings(max_depth=1))
    assert result["subtasks"][0]["fork"] is False


def test_no_depth_note_when_nothing_wanted_to_fork() -> None:
    result = normalise_plan(parallel(sub("a")), AprSettings(max_depth=1))
    assert result["notes"] == []


def test_token_allowances_are_clamped_to_the_thread_bounds() -> None:
    plan = parallel(
        sub("tiny", max_tokens=1),
        sub("huge", max_tokens=100_000),
        sub("fits", max_tokens=300),
        sub("low_edge", max_tokens=64),
        sub("high_edge", max_tokens=900),
        sub("unset"),
    )
    result = normalise_plan(plan, AprSettings(min_thread_tokens=64, worker_max_tokens=900))
    assert {s["id"]: s["max_tokens"] for s in result["subtasks"]} == {
        "tiny": 64,
        "huge": 900,
        "fits": 300,
        "low_edge": 64,
        "high_edge": 900,
        "unset": None,
    }
    assert result["notes"] == []  # clamping an allowance is routine, not a repair to report


def test_a_repeated_dependency_is_merged_without_a_note() -> None:
    subtasks = [
        SubtaskRecord(id="a", goal="g", depends_on=[], fork=False, max_tokens=None),
        SubtaskRecord(id="b", goal="g", depends_on=["a", "a"], fork=False, max_tokens=None),
    ]
    notes: list[str] = []
    repair_dependencies(subtasks, notes)
    assert subtasks[1]["depends_on"] == ["a"]
    assert notes == []


# -- repeated goals --------------------------------------------------------------------------


def test_one_goal_repeated_becomes_a_vote_of_different_attempts() -> None:
    same = [sub(f"s{i}", "Find x such that 3x + 4 = 19.") for i in range(1, 5)]
    result = normalise_plan(parallel(*same, merge="synthesize"), AprSettings())
    assert result["merge"] == "vote"
    goals = [s["goal"] for s in result["subtasks"]]
    assert goals[0] == "Find x such that 3x + 4 = 19."
    assert len(set(goals)) == 4  # every attempt is asked differently
    assert all(g.startswith("Find x such that 3x + 4 = 19.") for g in goals)
    temperatures = [s.get("temperature") for s in result["subtasks"]]
    assert temperatures == [None, 0.7, 0.7, 0.7]
    assert "same goal" in result["notes"][0]


def test_one_goal_repeated_under_the_models_concat_is_not_a_split() -> None:
    # Seen on a 1.5B planner: "Write a limerick about a cat, a tweet ..., and a joke ..."
    # planned as that whole task four times, merge concat; it used to run as a vote of four.
    task = "Write a limerick about a cat, a tweet about a launch, and a joke about code."
    result = normalise_plan(
        parallel(*[sub(f"s{i}", task) for i in range(4)], merge="concat"), AprSettings()
    )
    assert result["strategy"] == "direct"
    assert result["notes"] == [
        "all 4 subtasks repeat one goal under merge concat: not split",
        "parallel plan had no subtasks: answering directly",
    ]
    forced = normalise_plan(
        parallel(*[sub(f"s{i}", task) for i in range(3)]), AprSettings(merge="concat")
    )
    assert forced["strategy"] == "parallel"  # the caller asked for concat: attempts, as asked


def test_a_repeated_goal_among_others_is_solved_once() -> None:
    plan = parallel(
        sub("a", "Capital of Kenya"),
        sub("b", "capital of  kenya."),
        sub("c", "17*23"),
        sub("d", "combine", depends_on=["b", "c"]),
    )
    result = normalise_plan(plan, AprSettings())
    assert [s["id"] for s in result["subtasks"]] == ["a", "c", "d"]
    assert deps(result)["d"] == ["a", "c"]  # pointed at the one kept
    assert result["merge"] == "synthesize"
    assert "repeat the goal" in result["notes"][0]


def test_a_forced_merge_is_kept_for_repeated_goals() -> None:
    same = [sub(f"s{i}", "guess") for i in range(3)]
    result = normalise_plan(parallel(*same), AprSettings(merge="best"))
    assert result["merge"] == "best"


def test_plan_level_options_name_goals_by_number_or_id() -> None:
    # The schema's short form: goals alone, then their rare options by goal number.
    plan = Plan.model_validate(
        {
            "strategy": "parallel",
            "merge": "synthesize",
            "subtasks": ["population of Canada", "population of Australia", "compare them"],
            "depends_on": {"3": [1, "s2"]},
            "fork": [2],
        }
    )
    record = normalise_plan(plan, AprSettings(max_depth=3))
    assert [(s["id"], s["depends_on"], s["fork"]) for s in record["subtasks"]] == [
        ("s1", [], False),
        ("s2", [], True),
        ("s3", ["s1", "s2"], False),
    ]
    assert record["notes"] == []


def test_plan_level_options_naming_no_goal_are_reported_not_guessed() -> None:
    plan = Plan.model_validate(
        {
            "strategy": "parallel",
            "subtasks": ["one", "two"],
            "depends_on": {"2": [7], "9": [1], "x": "junk"},
            "fork": [5, True],
        }
    )
    record = normalise_plan(plan, AprSettings(max_depth=3))
    assert [(s["depends_on"], s["fork"]) for s in record["subtasks"]] == [([], False), ([], False)]
    assert record["notes"] == ["s2: ignored unknown or self dependencies ['7']"]


@pytest.mark.parametrize(
    ("task", "parts"),
    [
        (
            "Answer each part: (a) What is 64 / 8? (b) What is the capital of Spain? (c) 2 + 2?",
            {"a": "What is 64 / 8?", "b": "What is the capital of Spain?", "c": "2 + 2?"},
        ),
        (
            "1) Convert 5 km to miles. 2) Who wrote Emma?",
            {"1": "Convert 5 km to miles.", "2": "Who wrote Emma?"},
        ),
        (
            "Steps: 1. Sort the list. 2. Print it, 3.5 wide.",
            {"1": "Sort the list.", "2": "Print it, 3.5 wide."},
        ),
        # Parts that are phrases: a sentence after the last is the task's closing instruction.
        (
            "Review (a) calc.py (b) data.py (c) sample.py. Give the findings for each file.",
            {"a": "calc.py", "b": "data.py", "c": "sample.py."},
        ),
        (  # parts that are sentences keep every sentence of the last
            "Solve (1) Tom has 3 apples. He eats 1. How many are left? (2) Sam has 5 pears. "
            "He gets 2 more. How many now?",
            {
                "1": "Tom has 3 apples. He eats 1. How many are left?",
                "2": "Sam has 5 pears. He gets 2 more. How many now?",
            },
        ),
        (  # after questions, the last part is never cut
            "(a) What is 2 + 2? (b) Who wrote Emma? (c) Tom has 3 apples. He eats one. How many?",
            {
                "a": "What is 2 + 2?",
                "b": "Who wrote Emma?",
                "c": "Tom has 3 apples. He eats one. How many?",
            },
        ),
        ("What is 3.5 * 2?", {}),  # a decimal is no label
        ("Explain (b) first, then (c).", {}),  # a list starts at (a) or 1
        ("Only (a) this one.", {}),  # one part is not a list
    ],
)
def test_labelled_parts_of_a_task(task: str, parts: dict[str, str]) -> None:
    assert labelled_parts(task) == parts


def test_a_goal_that_only_names_a_part_of_the_task_gets_its_text() -> None:
    # A 1.5B planner wrote ["answer (a)", "answer (b)", "answer (c)"]; told only "answer (a)",
    # its threads answered other parts or called them dead ends.
    task = "Answer each part: (a) What is 64 / 8? (b) What is the capital of Spain? (c) 9 * 9?"
    plan = parallel_goals("answer (a)", "Answer part (b)", "Compute 9 * 9")
    record = normalise_plan(plan, AprSettings(), task=task)
    assert [s["goal"] for s in record["subtasks"]] == [
        "(a) What is 64 / 8?",
        "(b) What is the capital of Spain?",
        "Compute 9 * 9",
    ]
    assert record["notes"] == [
        "goals that only named a part of the task were given its text: ['s1', 's2']"
    ]
    # Without labelled parts in the task, a goal is left as written.
    assert normalise_plan(plan, AprSettings(), task="q")["subtasks"][0]["goal"] == "answer (a)"


def parallel_goals(*goals: str) -> Plan:
    return Plan.model_validate({"strategy": "parallel", "subtasks": list(goals)})


# -- a plan still being written -----------------------------------------------------------

LABELLED_TASK = "Answer each part: (a) What is 2 + 3? (b) Name a prime. (c) Spell cat."

PREFIX_CASES = {
    "plain": [sub("s1"), sub("s2"), sub("s3"), sub("s4")],
    "ids missing, repeated or with slashes": [
        sub(""),
        sub("x", "one"),
        sub("x", "two"),
        sub("a/b", "three"),
        sub("", "four"),
    ],
    "empty goals among the others": [sub("s1"), sub("s2", " "), sub("s3"), sub("s4", "")],
    "goals that only name a part": [sub("s1", "(a)"), sub("s2", "answer part b"), sub("s3")],
    "a goal repeated among others": [sub("s1"), sub("s2"), sub("s3", "goal of s1"), sub("s4")],
    "one goal again and again": [sub("s1", "same"), sub("s2", "same"), sub("s3", "Same.")],
    "a dependency after plain subtasks": [sub("s1"), sub("s2"), sub("s3", depends_on=["s1"])],
    "a cycle": [sub("s1", depends_on=["s2"]), sub("s2", depends_on=["s1"]), sub("s3")],
    "forks and allowances": [sub("s1", fork=True), sub("s2", max_tokens=1), sub("s3")],
    "more than max_threads": [sub(f"s{i}") for i in range(1, 9)],
}


@pytest.mark.parametrize("depth", [0, 1])
@pytest.mark.parametrize("case", PREFIX_CASES)
def test_a_plan_repaired_as_it_streams_matches_the_repair_of_each_prefix(
    case: str, depth: int
) -> None:
    from apr_graph.plan import PlanPrefix

    settings = AprSettings(max_threads=5, max_depth=2)
    written = parallel(*PREFIX_CASES[case], merge="synthesize").subtasks
    prefix = PlanPrefix(settings, depth=depth, task=LABELLED_TASK)
    # Subtasks arrive one, two or none at a time, as a stream's pieces bring them.
    at = 0
    for size in [1, 0, 2, 1, 3, 1, 1]:
        new, at = written[at : at + size], at + size
        got = prefix.extend("synthesize", new, slots=6)
        whole = normalise_plan(
            parallel(*[s.model_dump() for s in written[:at]], merge="synthesize"),
            settings,
            depth=depth,
            slots=6,
            task=LABELLED_TASK,
        )
        if whole["strategy"] == "direct":  # nothing with a goal yet
            assert got["subtasks"] == []
        else:
            assert (got["merge"], got["subtasks"]) == (whole["merge"], whole["subtasks"])
        if at >= len(written):
            break
