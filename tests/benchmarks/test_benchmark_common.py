"""benchmarks.common.time_round_robin: who is called when, and what is recorded."""

import pytest

from benchmarks.common import time_round_robin


def _recorder(log):
    return {name: (lambda name=name: log.append(name) or name.upper()) for name in ("a", "b", "c")}


@pytest.mark.parametrize(
    "alternate, rounds", [(False, ["abc", "abc", "abc"]), (True, ["abc", "cba", "abc"])]
)
def test_warm_up_then_rounds_in_turn(alternate, rounds):
    log, seen = [], []
    first, times = time_round_robin(
        _recorder(log),
        3,
        alternate=alternate,
        after_first=lambda name, result: seen.append((name, result, len(log))),
    )
    assert "".join(log) == "abc" + "".join(rounds)
    assert seen == [
        ("a", "A", 1),
        ("b", "B", 2),
        ("c", "C", 3),
    ]  # right after each warm-up call, untimed
    assert set(first) == set(times) == {"a", "b", "c"}
    assert all(len(v) == 3 and all(t >= 0 for t in v) for v in times.values()) and all(
        t >= 0 for t in first.values()
    )


def test_self_timed_calls_report_their_own_seconds():
    counter = iter(range(100))
    first, times = time_round_robin({"x": lambda: float(next(counter))}, 2, self_timed=True)
    assert first == {"x": 0.0} and times == {"x": [1.0, 2.0]}
