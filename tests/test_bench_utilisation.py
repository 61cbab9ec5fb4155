"""bench/utilisation.py's arithmetic: a node's wall time split from the hub's records."""

from __future__ import annotations

import pytest

from tests.benches import load_bench


@pytest.fixture(scope="module")
def bench():
    return load_bench("utilisation")


def test_split_adds_up_to_the_wall_time(bench) -> None:
    """Round 0: assigned at 0, trained 6 s, stored at 10; the peer's upload came at 12 and the
    hub opened round 1 at 15. Round 1: assigned at 15, trained 6 s, stored last at 25."""
    fig = bench.node_utilisation(
        assigned=[0.0, 15.0],
        acked=[(25.0, 6.0, 30, 1), (10.0, 6.0, 30, 0)],
        round_last_ack={0: 12.0, 1: 25.0},
        opened_at={0: 0.0, 1: 15.0},
    )
    assert fig["wall_s"] == 25.0 and fig["compute_s"] == 12.0
    assert fig["utilisation"] == pytest.approx(0.48)
    assert (fig["peers_s"], fig["hub_close_s"], fig["link_and_rest_s"]) == (2.0, 3.0, 8.0)
    assert fig["steady_utilisation"] == pytest.approx(6.0 / 15.0)
    assert fig["steady_waiting_s_per_round"] == pytest.approx(9.0)
    assert fig["step_s"] == pytest.approx(0.2)


def test_link_cost_is_beyond_the_control(bench) -> None:
    cases = [
        {"side": "no-overlap", "link": "control", "mean_steady_waiting_s_per_round": 4.0},
        {"side": "no-overlap", "link": "20M-200ms", "mean_steady_waiting_s_per_round": 13.0},
        {"side": "overlap", "link": "20M-200ms", "mean_steady_waiting_s_per_round": 1.0},
    ]
    bench.add_link_costs(cases)
    assert cases[1]["link_cost_s_per_round"] == 9.0
    assert "link_cost_s_per_round" not in cases[0]  # the control itself
    assert "link_cost_s_per_round" not in cases[2]  # no overlap control to compare with
