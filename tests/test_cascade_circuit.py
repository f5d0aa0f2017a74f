"""The escalation circuit breaker's state machine (issue 13), on a clock the test moves.

The real-process checks (it opens on a stopped teacher and recovers) are in test_cascade_serving.py.
"""

from __future__ import annotations

from serving.cascade import CLOSED, HALF_OPEN, OPEN, CircuitBreaker


def test_the_circuit_breaker_opens_half_opens_and_closes() -> None:
    now = [0.0]
    states: list[str] = []
    breaker = CircuitBreaker(2, 5.0, on_state=states.append, clock=lambda: now[0])
    assert breaker.allow()
    breaker.failure()
    assert breaker.state == CLOSED and breaker.allow()
    breaker.failure()
    assert breaker.state == OPEN and not breaker.allow()
    now[0] = 5.0
    assert breaker.allow() and breaker.state == HALF_OPEN
    assert not breaker.allow()  # one trial at a time
    breaker.failure()  # the trial failed: open again at once
    assert breaker.state == OPEN and not breaker.allow()
    now[0] = 10.0
    assert breaker.allow()
    breaker.success()
    assert breaker.state == CLOSED and breaker.allow()
    assert states == [OPEN, HALF_OPEN, OPEN, HALF_OPEN, CLOSED]
