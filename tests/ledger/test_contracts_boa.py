"""Contract unit tests in titanoboa (in-process EVM): token, escrow, claims, anchors, refunds."""

from __future__ import annotations

import boa
import pytest

from gridswarm.ledger.evm import CONTRACTS_DIR
from gridswarm.ledger.merkle import RewardTree, reward_leaf


@pytest.fixture(scope="module")
def deployers():
    token = boa.load_partial(str(CONTRACTS_DIR / "RewardToken.vy"))
    escrow = boa.load_partial(str(CONTRACTS_DIR / "RunEscrow.vy"))
    return token, escrow


@pytest.fixture
def run(deployers):
    """A token, an escrow funded with 10,000 units, and the actors' addresses."""
    token_deployer, escrow_deployer = deployers
    with boa.env.anchor():
        owner = boa.env.eoa
        hub, sponsor = boa.env.generate_address("hub"), boa.env.generate_address("sponsor")
        nodes = [boa.env.generate_address(f"node{i}") for i in range(5)]
        token = token_deployer.deploy("gridswarm reward", "GRID", 18)
        escrow = escrow_deployer.deploy(token.address, hub, sponsor)
        token.mint(sponsor, 10_000)
        with boa.env.prank(sponsor):
            token.approve(escrow.address, 10_000)
            escrow.fund(10_000)
        yield {
            "owner": owner,
            "hub": hub,
            "sponsor": sponsor,
            "nodes": nodes,
            "token": token,
            "escrow": escrow,
        }


def post(run, tree: RewardTree) -> None:
    with boa.env.prank(run["hub"]):
        run["escrow"].post_root(tree.epoch, tree.root, tree.total_units)


def test_token_basics(run) -> None:
    token, sponsor, node = run["token"], run["sponsor"], run["nodes"][0]
    assert (token.name(), token.symbol(), token.decimals()) == ("gridswarm reward", "GRID", 18)
    assert token.totalSupply() == 10_000 and token.balanceOf(run["escrow"].address) == 10_000
    with boa.env.prank(node), boa.reverts("only owner"):
        token.mint(node, 1)
    with boa.env.prank(node), boa.reverts("insufficient balance"):
        token.transfer(sponsor, 1)
    token.mint(node, 50)
    with boa.env.prank(node):
        token.transfer(sponsor, 20)
    assert token.balanceOf(node) == 30 and token.balanceOf(sponsor) == 20
    with boa.env.prank(node), boa.reverts("insufficient allowance"):
        token.transferFrom(sponsor, node, 1)


def test_leaf_encoding_matches_python(run) -> None:
    escrow = run["escrow"]
    for i, node in enumerate(run["nodes"]):
        tree = RewardTree(i, {node: 7 * i + 1, run["sponsor"]: 3})
        post(run, tree)
        claim = tree.claim(node)
        assert escrow.verify_claim(node, i, claim.cumulative_units, list(claim.proof))
        assert not escrow.verify_claim(node, i, claim.cumulative_units + 1, list(claim.proof))
    assert reward_leaf(run["nodes"][0], 1) != reward_leaf(run["nodes"][1], 1)


def test_cumulative_claims_over_epochs(run) -> None:
    escrow, token, (a, b, c, *_) = run["escrow"], run["token"], run["nodes"]
    first = RewardTree(0, {a: 100, b: 250, c: 50})
    post(run, first)
    assert escrow.claim(a, 0, 100, list(first.claim(a).proof)) == 100
    with boa.reverts("nothing to claim"):
        escrow.claim(a, 0, 100, list(first.claim(a).proof))
    with boa.reverts("invalid proof"):
        escrow.claim(b, 0, 2500, list(first.claim(b).proof))
    second = RewardTree(1, {a: 400, b: 250, c: 90})
    post(run, second)
    assert escrow.claim(a, 1, 400, list(second.claim(a).proof)) == 300  # cumulative − claimed
    assert escrow.claim(b, 1, 250, list(second.claim(b).proof)) == 250
    with boa.reverts("nothing to claim"):  # an older, smaller epoch pays nothing more
        escrow.claim(a, 0, 100, list(first.claim(a).proof))
    assert token.balanceOf(a) == 400 and token.balanceOf(b) == 250
    assert escrow.claimed_total() == 650 and escrow.allocated() == 740
    with boa.reverts("no root for epoch"):
        escrow.claim(c, 7, 90, list(second.claim(c).proof))


def test_root_posting_rules(run) -> None:
    escrow, a = run["escrow"], run["nodes"][0]
    tree = RewardTree(0, {a: 100})
    with boa.reverts("only hub"):
        escrow.post_root(0, tree.root, 100)
    with boa.env.prank(run["hub"]):
        with boa.reverts("epochs are posted in order"):
            escrow.post_root(1, tree.root, 100)
        with boa.reverts("allocation exceeds funding"):
            escrow.post_root(0, tree.root, 10_001)
        escrow.post_root(0, tree.root, 100)
        with boa.reverts("cumulative total cannot shrink"):
            escrow.post_root(1, tree.root, 99)
    assert escrow.epochs() == 1 and escrow.roots(0) == tree.root


def test_anchor_write_once_and_listed(run) -> None:
    escrow = run["escrow"]
    with boa.reverts("only hub"):
        escrow.anchor(8, b"\x01" * 32)
    with boa.env.prank(run["hub"]):
        escrow.anchor(8, b"\x01" * 32)
        escrow.anchor(17, b"\x02" * 32)
        with boa.reverts("already anchored"):
            escrow.anchor(8, b"\x03" * 32)
    assert escrow.anchor_count() == 2
    assert [escrow.anchor_seq(i) for i in range(2)] == [8, 17]
    assert escrow.anchors(17) == b"\x02" * 32


def test_refund_only_unallocated_after_close(run) -> None:
    escrow, token, sponsor, a = run["escrow"], run["token"], run["sponsor"], run["nodes"][0]
    post(run, RewardTree(0, {a: 4_000}))
    with boa.env.prank(sponsor), boa.reverts("run not closed"):
        escrow.refund()
    with boa.env.prank(a), boa.reverts("only hub or sponsor"):
        escrow.close()
    with boa.env.prank(run["hub"]):
        escrow.close()
    with boa.env.prank(a), boa.reverts("only sponsor"):
        escrow.refund()
    with boa.env.prank(sponsor):
        assert escrow.refund() == 6_000
        with boa.reverts("nothing to refund"):
            escrow.refund()
        with boa.reverts("run closed"):
            escrow.fund(1)
    assert token.balanceOf(sponsor) == 6_000
    assert token.balanceOf(escrow.address) == 4_000  # exactly what nodes may still claim
