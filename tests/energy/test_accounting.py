from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gridswarm.energy.accounting import (
    ContributionEnergy,
    NodeProfile,
    agnostic_counterfactual_g,
    emissions_g,
    format_report,
    run_report,
)
from tests.examples import examples


def test_emissions_formula():
    assert emissions_g(1000, 300) == pytest.approx(300)  # 1 kWh at 300 g/kWh
    assert emissions_g(1000, 300, local_energy_wh=500, local_intensity_g_per_kwh=40) == (
        pytest.approx(150 + 20)
    )
    with pytest.raises(ValueError, match="exceeds"):
        emissions_g(10, 300, local_energy_wh=11)
    with pytest.raises(ValueError, match=">= 0"):
        emissions_g(-1, 300)


def test_record_derives_emissions_and_shares():
    r = ContributionEnergy("n1", "DE", 3, 0.0, 1800.0, 9e6, 150.0, 320.0, local_energy_wh=50.0)
    assert r.emissions_g == pytest.approx((100 * 320 + 50 * 41) / 1000)
    assert r.local_surplus_share == pytest.approx(1 / 3)
    assert r.power_w == pytest.approx(300.0)
    with pytest.raises(ValueError, match="negative"):
        ContributionEnergy("n1", "DE", 3, 0.0, 1800.0, -1, 150.0, 320.0)


records_strategy = st.lists(
    st.builds(
        lambda node, region, tokens, wh, g, local_frac: ContributionEnergy(
            node, region, 0, 0.0, 600.0, tokens, wh, g, local_energy_wh=wh * local_frac
        ),
        st.sampled_from(["a", "b", "c"]),
        st.sampled_from(["DE", "FR"]),
        st.floats(0, 1e9),
        st.floats(0, 5e3),
        st.floats(0, 900),
        st.floats(0, 1),
    ),
    max_size=40,
)


@settings(max_examples=examples(100), deadline=None)
@given(records_strategy)
def test_totals_equal_the_sum_of_contributions(records):
    rep = run_report(records)
    assert rep.total.contributions == len(records)
    assert rep.total.tokens == pytest.approx(sum(r.tokens for r in records))
    assert rep.total.energy_kwh == pytest.approx(sum(r.energy_wh for r in records) / 1e3)
    assert rep.total.emissions_kg == pytest.approx(sum(r.emissions_g for r in records) / 1e3)
    for part in (rep.per_node, rep.per_region):
        assert sum(t.emissions_kg for t in part.values()) == pytest.approx(rep.total.emissions_kg)
        assert sum(t.tokens for t in part.values()) == pytest.approx(rep.total.tokens)
        assert sum(t.local_energy_kwh for t in part.values()) == pytest.approx(
            rep.total.local_energy_kwh
        )
    if rep.total.tokens > 0:
        assert rep.total.g_per_1k_tokens == pytest.approx(
            rep.total.emissions_kg * 1e6 / rep.total.tokens
        )


def test_report_against_counterfactual_and_text():
    recs = [
        ContributionEnergy("a", "FR", 0, 0.0, 3600.0, 1e6, 100.0, 50.0),
        ContributionEnergy("b", "DE", 0, 0.0, 3600.0, 1e6, 100.0, 400.0, local_energy_wh=100.0),
    ]
    rep = run_report(recs, agnostic_emissions_g=100.0)
    assert rep.total.emissions_kg == pytest.approx((5 + 4.1) / 1000)
    assert rep.reduction_vs_agnostic == pytest.approx(1 - 9.1 / 100)
    assert rep.per_node["b"].local_surplus_share == 1.0
    text = format_report(rep)
    assert "agnostic counterfactual" in text and "run" in text and "b" in text
    assert run_report(recs).reduction_vs_agnostic is None


def test_agnostic_counterfactual_constant_intensity():
    nodes = [NodeProfile("a", "FR", 100.0, 200.0), NodeProfile("b", "DE", 300.0, 400.0)]
    # 1.44e6 tokens at 400 tok/s = 3600 s; 200 W at 50 g + 400 W at 400 g for 1 h
    g = agnostic_counterfactual_g(
        nodes, 1.44e6, 0.0, lambda nid, t: {"a": 50.0, "b": 400.0}[nid], step_s=600
    )
    assert g == pytest.approx(0.2 * 50 + 0.4 * 400)
    # intensity varying in time: the first half hour at 100, then 300 -> mean 200
    g2 = agnostic_counterfactual_g(
        [NodeProfile("a", "X", 1.0, 1000.0)], 3600, 0.0, lambda n, t: 100.0 if t < 1800 else 300.0
    )
    assert g2 == pytest.approx(200.0)
    with pytest.raises(ValueError, match="tokens_per_s"):
        agnostic_counterfactual_g([], 1, 0, lambda n, t: 1)
