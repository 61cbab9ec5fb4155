from dataclasses import replace

from gridswarm.hub.rounds import (
    ARRIVING_GRACE_S,
    AssignmentState,
    Decision,
    RoundRules,
    RoundState,
    Screening,
    budget_reason,
    decide,
    decide_after_screening,
    lost_assignments,
    may_assign,
)
from gridswarm.hub.scheduler import plan_inner_steps, update_speed

RULES = RoundRules(quorum=2, min_nodes=2, max_nodes=3, deadline_s=60, liveness_s=10)


def state(*statuses, deadline=100.0, status="open", seen=95.0):
    return RoundState(
        status, deadline, tuple(AssignmentState(f"n{i}", s, seen) for i, s in enumerate(statuses))
    )


def test_closes_when_all_in_with_quorum():
    assert decide(state("submitted", "submitted"), RULES, 50) is Decision.CLOSE


def test_waits_for_outstanding_work_before_the_deadline():
    assert decide(state("submitted", "submitted", "assigned"), RULES, 50) is Decision.WAIT


def test_deadline_closes_with_quorum_and_replans_without():
    assert decide(state("submitted", "submitted", "assigned"), RULES, 100) is Decision.CLOSE
    assert decide(state("submitted", "assigned"), RULES, 100) is Decision.REPLAN
    assert decide(state(), RULES, 100) is Decision.REPLAN


def test_the_deadline_waits_a_while_for_uploads_that_reached_the_hub_in_time():
    """Uploads received by the deadline and still in the hub's own queue keep the round open,
    for at most ARRIVING_GRACE_S; without them the deadline decides as before."""
    waiting = replace(state("submitted", "submitted", "assigned"), arriving=1)
    assert decide(waiting, RULES, 100) is Decision.WAIT
    assert decide(waiting, RULES, 100 + ARRIVING_GRACE_S - 0.1) is Decision.WAIT
    assert decide(waiting, RULES, 100 + ARRIVING_GRACE_S) is Decision.CLOSE
    short = replace(state("submitted", "assigned"), arriving=2)  # below quorum: a re-plan waits
    assert decide(short, RULES, 100) is Decision.WAIT
    assert decide(short, RULES, 100 + ARRIVING_GRACE_S) is Decision.REPLAN
    assert decide(replace(waiting, arriving=0), RULES, 100) is Decision.CLOSE


def test_all_in_below_quorum_waits_for_more_nodes():
    assert decide(state("submitted", "missed"), RULES, 50) is Decision.WAIT


def test_screening_that_leaves_fewer_than_the_quorum_replans_instead_of_closing():
    assert decide_after_screening(Screening(accepted=2, rejected=0), RULES) is Decision.CLOSE
    assert decide_after_screening(Screening(accepted=2, rejected=1), RULES) is Decision.CLOSE
    assert decide_after_screening(Screening(accepted=1, rejected=1), RULES) is Decision.REPLAN
    assert decide_after_screening(Screening(accepted=0, rejected=2), RULES) is Decision.REPLAN
    # SecAgg dropouts within t were part of the quorum that fixed the participants
    assert decide_after_screening(Screening(1, 0, dropped=1), RULES) is Decision.CLOSE


def test_a_run_finishes_at_its_round_or_token_budget_and_says_which():
    assert budget_reason(None, None, 10**6, 10**9) is None
    assert budget_reason(6, None, 5, 0) is None
    assert budget_reason(6, None, 6, 0) == "budget.rounds reached: 6 of 6 rounds"
    assert budget_reason(None, 1000, 2, 999) is None
    assert budget_reason(None, 1000, 2, 1024) == "budget.tokens reached: 1024 of 1000 tokens"


def test_silent_nodes_are_lost():
    s = RoundState(
        "open",
        100.0,
        (AssignmentState("a", "assigned", 10.0), AssignmentState("b", "assigned", 45.0)),
    )
    assert lost_assignments(s, RULES, 50.0) == ["a"]


def test_who_may_join_a_round():
    assert may_assign(state("assigned", status="open"), RULES, "n0", 3, 50) is not None
    assert may_assign(state("assigned", status="open"), RULES, "new", 3, 50) is None
    assert "full" in may_assign(state("assigned", "submitted", "assigned"), RULES, "x", 3, 50)
    assert "live nodes" in may_assign(state(status="pending"), RULES, "x", 1, 50)
    assert may_assign(state(status="closed"), RULES, "x", 3, 50) == "round closed"


def test_slow_nodes_get_fewer_steps_and_finish_together():
    fast = plan_inner_steps(1000, 1000, 100, 50, 5, time_left_s=60, reserve_s=5)
    slow = plan_inner_steps(250, 1000, 100, 50, 5, time_left_s=60, reserve_s=5)
    assert fast.inner_steps == 50 and slow.inner_steps == 12
    assert abs(fast.expected_duration_s - slow.expected_duration_s) < 0.2 * fast.expected_duration_s


def test_a_very_slow_node_still_gets_the_minimum_when_it_fits():
    plan = plan_inner_steps(10, 1000, 100, 50, 5, time_left_s=600, reserve_s=5)
    assert plan.inner_steps == 5


def test_no_work_that_cannot_finish_before_the_deadline():
    plan = plan_inner_steps(100, 100, 100, 50, 5, time_left_s=20, reserve_s=5)
    assert plan.inner_steps == 15
    assert plan_inner_steps(100, 100, 100, 50, 5, time_left_s=8, reserve_s=5) is None


def test_speed_is_a_moving_average():
    assert update_speed(None, 1000, 2.0) == 500
    assert update_speed(500, 1000, 1.0) == 750
