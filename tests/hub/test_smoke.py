from gridswarm.identity import Identity
from gridswarm.protocol import API
from tests.conftest import tiny_run
from tests.hub.harness import Hub, contribution


def test_in_process_round_closes(tmp_path):
    hub = Hub(tmp_path)
    sponsor, node = Identity.generate(), Identity.generate()
    hub.register(node)
    run_id = hub.create_run(sponsor, tiny_run(trust={"audit_max_rate": 0, "audit_min_rate": 0}))
    a = hub.assignment(node, run_id)
    body = contribution(a, hub.numel(run_id), 32 * 8)
    r = hub.post(node, f"{API}/runs/{run_id}/contributions", body)
    assert r.status_code == 200, r.text
    hub.service.tick()
    assert hub.run_row(run_id).version == 1
