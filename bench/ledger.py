"""Ledger benchmark: embedded ledger (SQLite file) throughput, EVM settlement gas/claims on anvil.

    python bench/ledger.py --quick --out bench/results/ledger.json

Writes JSON to --out, a markdown table next to it (.md) and a bar chart (.png). Embedded: appends/s
for hub-signed entries and for pre-signed node claims (batches of --batch in one transaction, and
one entry per transaction), full verify entries/s, balance fold entries/s. EVM (real anvil on
127.0.0.1): gas per deploy, fund, epoch-root post, claim and checkpoint anchor; claims/s sent one
by one (wait for each receipt) and pipelined (send all, then wait).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from rich.console import Console
from rich.progress import Progress
from web3 import Web3

from gridswarm.identity import Identity
from gridswarm.ledger.anvil import Anvil, find_anvil, funded_account
from gridswarm.ledger.chain import sign_claim
from gridswarm.ledger.evm import EvmSettlement
from gridswarm.ledger.log import open_ledger
from gridswarm.ledger.merkle import RewardTree
from gridswarm.trust.rewards import ContributionScore, split_round_pool

TARGET_APPENDS_PER_S = 10_000
TARGET_VERIFIES_PER_S = 5_000
console = Console(stderr=True)


def bench_embedded(entries: int, batch: int, single: int, progress: Progress) -> dict:
    """Throughput of the embedded ledger on an SQLite file (WAL, synchronous=FULL)."""
    hub = Identity.from_seed(b"bench-hub")
    nodes = [Identity.from_seed(f"bench-node-{i}".encode()) for i in range(50)]
    out: dict = {"entries": entries, "batch": batch, "checkpoint_every": 1024}
    with tempfile.TemporaryDirectory() as tmp:
        ledger = open_ledger(f"sqlite:///{tmp}/ledger.db", hub, checkpoint_every=1024)
        task = progress.add_task("embedded: hub-signed appends", total=entries)
        t0 = time.perf_counter()
        for start in range(0, entries, batch):
            n = min(batch, entries - start)
            ledger.append_many(
                [("round", {"round": start + i, "tokens": 4096, "node": i % 50}) for i in range(n)]
            )
            progress.advance(task, n)
        out["hub_appends_per_s"] = entries / (time.perf_counter() - t0)

        claims = [
            sign_claim(
                nodes[i % 50],
                "contribution",
                {"round": i, "tokens": 4096, "energy_wh": 1.25, "blob": f"{i:064x}"},
            )
            for i in range(entries)
        ]
        half = entries // 2
        task = progress.add_task("embedded: node-claim appends", total=entries)
        t0 = time.perf_counter()
        for start in range(0, half, batch):
            ledger.append_many(claims[start : min(start + batch, half)])
            progress.advance(task, min(batch, half - start))
        out["claim_appends_per_s"] = half / (time.perf_counter() - t0)
        # the hub checks each claim when it arrives (to answer a bad one with a 4xx) ...
        t0 = time.perf_counter()
        for claim in claims[half:]:
            claim.check()
        out["claim_checks_per_s"] = (entries - half) / (time.perf_counter() - t0)
        # ... and then appends without verifying the signatures a second time
        t0 = time.perf_counter()
        for start in range(half, entries, batch):
            ledger.append_many(claims[start : start + batch], signatures_checked=True)
            progress.advance(task, min(batch, entries - start))
        out["prechecked_claim_appends_per_s"] = (entries - half) / (time.perf_counter() - t0)

        task = progress.add_task("embedded: one entry per transaction", total=single)
        t0 = time.perf_counter()
        for i in range(single):
            ledger.append("round", {"single": i})
            progress.advance(task)
        out["single_appends_per_s"] = single / (time.perf_counter() - t0)

        total = len(ledger)
        task = progress.add_task("embedded: full verify", total=1)
        t0 = time.perf_counter()
        report = ledger.verify()
        out["verify_s"] = time.perf_counter() - t0
        progress.advance(task)
        if not report.ok:
            raise RuntimeError(f"benchmark ledger failed to verify: {report.reason}")
        out["verified_entries"] = report.checked
        out["verifies_per_s"] = report.checked / out["verify_s"]
        out["checkpoints"] = report.checkpoints
        t0 = time.perf_counter()
        ledger.balances()
        out["fold_entries_per_s"] = total / (time.perf_counter() - t0)
        db = Path(tmp) / "ledger.db"
        out["bytes_per_entry"] = db.stat().st_size / total
        ledger.engine.dispose()
    return out


def bench_evm(nodes: int, epochs: int, progress: Progress) -> dict:
    """Gas and claim throughput of RunEscrow on a real anvil node."""
    out: dict = {"nodes": nodes, "epochs": epochs}
    with Anvil(find_anvil(install=True)) as anvil:
        w3 = Web3(Web3.HTTPProvider(anvil.url))
        hub, sponsor = funded_account(w3), funded_account(w3)
        accounts = [funded_account(w3) for _ in range(nodes)]
        settlement, deploy_gas = EvmSettlement.deploy(
            w3, hub, hub_address=hub.address, sponsor_address=sponsor.address
        )
        out.update({f"gas_{k}": v for k, v in deploy_gas.items()})
        pool_per_round = 10**21
        settlement.mint(hub, sponsor.address, pool_per_round * epochs)
        out["gas_fund"] = settlement.fund(sponsor, pool_per_round * epochs).gas_used
        cumulative = {a.address: 0 for a in accounts}
        post_gas, claim_gas, sequential_s, pipelined_s = [], [], [], []
        task = progress.add_task("evm: epochs (post root + claims)", total=epochs)
        for epoch in range(epochs):
            scores = [
                ContributionScore(a.address, 1000 + 37 * i + epoch, 1.0)
                for i, a in enumerate(accounts)
            ]
            for account, units in split_round_pool(epoch, pool_per_round, scores).shares.items():
                cumulative[account] += units
            tree = RewardTree(epoch, cumulative)
            post_gas.append(settlement.post_epoch_root(hub, tree).gas_used)
            half = nodes // 2
            t0 = time.perf_counter()
            for a in accounts[:half]:
                claim_gas.append(settlement.claim(a, tree.claim(a.address)).gas_used)
            sequential_s.append((time.perf_counter() - t0) / half)
            t0 = time.perf_counter()
            results = settlement.claim_many([(a, tree.claim(a.address)) for a in accounts[half:]])
            pipelined_s.append((time.perf_counter() - t0) / (nodes - half))
            claim_gas.extend(r.gas_used for r in results)
            progress.advance(task)
        for a in accounts:
            if settlement.token_balance(a.address) != cumulative[a.address]:
                raise RuntimeError(f"claimed balance of {a.address} differs from its rewards")
        anchor_gas = [
            settlement.anchor_checkpoint(hub, 1024 * (k + 1) + k, bytes([k + 1]) * 32).gas_used
            for k in range(3)
        ]
        out.update(
            {
                "gas_post_root_first": post_gas[0],
                "gas_post_root_later": statistics.mean(post_gas[1:]) if epochs > 1 else None,
                "gas_claim_first": statistics.mean(claim_gas[:nodes]),
                "gas_claim_later": statistics.mean(claim_gas[nodes:]) if epochs > 1 else None,
                "proof_len": len(tree.claim(accounts[0].address).proof),
                "gas_anchor": statistics.mean(anchor_gas),
                "claims_per_s_sequential": 1 / statistics.mean(sequential_s),
                "claims_per_s_pipelined": 1 / statistics.mean(pipelined_s),
                "anvil": str(anvil.binary),
            }
        )
    return out


def bench_audit_cost(progress: Progress, repeats: int) -> dict:
    """Hub CPU spent verifying one contribution (bit-exact replay + usefulness evaluation) next
    to the node's own training, for the test-sized and the demo-sized run, and the audit rate a
    newcomer and a trusted node get: what auditing costs a live round."""
    import torch

    from gridswarm.config import RunConfig
    from gridswarm.demo import DEMO_RUN
    from gridswarm.train.codecs import make_codec
    from gridswarm.train.workload import Workload
    from gridswarm.trust.policy import audit_probability
    from gridswarm.trust.reputation import Reputation, RoundOutcome, update_reputation

    torch.set_num_threads(1)
    tiny = {
        "model": {"n_layer": 1, "n_head": 2, "n_embd": 32},
        "train": {"seq_len": 32, "batch_size": 8, "inner_steps": 20, "min_inner_steps": 2},
    }
    trusted = Reputation()
    for _ in range(10):
        ok = RoundOutcome(delivered=True, audit_passed=True, usefulness=1.0)
        trusted = update_reputation(trusted, ok)
    out: dict = {}
    task = progress.add_task("audit cost", total=2 * repeats)
    for name, settings in (("tiny", tiny), ("demo", DEMO_RUN)):
        cfg = RunConfig.model_validate(settings)
        node, hub = Workload.from_config(cfg), Workload.from_config(cfg)
        theta = node.initial_theta()
        node.train(theta, 0, "warm-up", 2)
        hub.train(theta, 0, "warm-up", 2)
        codec = make_codec(cfg.comm.codec, cfg.comm.block_size)
        train_s, replay_s, eval_s, exact = [], [], [], True
        for i in range(repeats):
            t0 = time.perf_counter()
            done = node.train(theta, i, "node", cfg.train.inner_steps)
            t1 = time.perf_counter()
            again = hub.train(theta, i, "node", cfg.train.inner_steps)
            t2 = time.perf_counter()
            hub.evaluate(theta - done.pseudo_gradient)
            t3 = time.perf_counter()
            a, b = codec.encode(done.pseudo_gradient), codec.encode(again.pseudo_gradient)
            exact &= all(torch.equal(a[k], b[k]) for k in a)
            train_s.append(t1 - t0)
            replay_s.append(t2 - t1)
            eval_s.append(t3 - t2)
            progress.advance(task)
        p_new = audit_probability(Reputation(), cfg.trust)
        p_trusted = audit_probability(trusted, cfg.trust)
        train, replay, ev = (statistics.median(x) for x in (train_s, replay_s, eval_s))
        out[name] = {
            "numel": node.numel,
            "inner_steps": cfg.train.inner_steps,
            "node_train_s": train,
            "hub_replay_s": replay,
            "hub_eval_s": ev,
            "bit_exact": exact,
            "audit_rate_newcomer": p_new,
            "audit_rate_trusted": p_trusted,
            # hub CPU per contribution / node CPU for it, at each audit rate
            "hub_share_newcomer": (p_new * replay + ev) / train,
            "hub_share_trusted": (p_trusted * replay + ev) / train,
        }
    return out


def write_outputs(result: dict, out: Path, command: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    e, v = result["embedded"], result["evm"]
    rows = [
        (
            "hub-signed appends/s (batches)",
            f"{e['hub_appends_per_s']:,.0f}",
            f"{e['hub_appends_per_s'] / TARGET_APPENDS_PER_S:.2f}× target {TARGET_APPENDS_PER_S:,}",
        ),
        (
            "node-claim appends/s (batches, signatures verified on append)",
            f"{e['claim_appends_per_s']:,.0f}",
            f"{e['claim_appends_per_s'] / TARGET_APPENDS_PER_S:.2f}× target",
        ),
        (
            "node-claim checks/s at the hub's edge (Ed25519 verify + form)",
            f"{e['claim_checks_per_s']:,.0f}",
            "",
        ),
        (
            "node-claim appends/s (batches, pre-checked at the edge)",
            f"{e['prechecked_claim_appends_per_s']:,.0f}",
            f"{e['prechecked_claim_appends_per_s'] / TARGET_APPENDS_PER_S:.2f}× target",
        ),
        (
            "appends/s, one per transaction",
            f"{e['single_appends_per_s']:,.0f}",
            f"{e['single_appends_per_s'] / e['hub_appends_per_s']:.3f}× batched",
        ),
        (
            "verified entries/s (full chain)",
            f"{e['verifies_per_s']:,.0f}",
            f"{e['verifies_per_s'] / TARGET_VERIFIES_PER_S:.2f}× target {TARGET_VERIFIES_PER_S:,}",
        ),
        ("balance fold entries/s", f"{e['fold_entries_per_s']:,.0f}", ""),
        ("bytes per entry (SQLite)", f"{e['bytes_per_entry']:.0f}", ""),
        (
            "gas: deploy token / escrow",
            f"{v['gas_deploy_token']:,} / {v['gas_deploy_escrow']:,}",
            "",
        ),
        ("gas: fund (transferFrom)", f"{v['gas_fund']:,}", ""),
        (
            "gas per round: post epoch root (first / later)",
            f"{v['gas_post_root_first']:,} / {v['gas_post_root_later'] or 0:,.0f}",
            "",
        ),
        (
            f"gas per claim, {v['proof_len']}-level proof (first / later)",
            f"{v['gas_claim_first']:,.0f} / {v['gas_claim_later'] or 0:,.0f}",
            "",
        ),
        ("gas: anchor a checkpoint root", f"{v['gas_anchor']:,.0f}", ""),
        ("claims/s, wait for each receipt", f"{v['claims_per_s_sequential']:.1f}", ""),
        (
            "claims/s, pipelined",
            f"{v['claims_per_s_pipelined']:.1f}",
            f"{v['claims_per_s_pipelined'] / v['claims_per_s_sequential']:.2f}× sequential",
        ),
    ]
    for name, a in result.get("audit", {}).items():
        rows += [
            (
                f"audit, {name} run ({a['numel']:,} params, H={a['inner_steps']}): "
                "node training / hub replay / hub usefulness eval, s",
                f"{a['node_train_s']:.3f} / {a['hub_replay_s']:.3f} / {a['hub_eval_s']:.3f}",
                f"replay bit-exact: {a['bit_exact']}",
            ),
            (
                f"audit, {name} run: hub CPU per contribution, newcomer "
                f"(p={a['audit_rate_newcomer']:.2f}) / trusted (p={a['audit_rate_trusted']:.3f})",
                f"{a['hub_share_newcomer']:.2f} / {a['hub_share_trusted']:.3f}",
                "× the node's own training",
            ),
        ]
    lines = [
        "# Ledger benchmark",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {result['machine']}. Embedded ledger: {e['entries']:,} entries per kind, "
        f"batches of {e['batch']}, SQLite WAL file, synchronous=FULL. "
        f"EVM: anvil, {v['nodes']} nodes, {v['epochs']} epochs.",
        "",
        "| measure | value | ratio |",
        "|---|---|---|",
        *[f"| {a} | {b} | {c} |" for a, b, c in rows],
        "",
    ]
    out.with_suffix(".md").write_text("\n".join(lines))

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    names = ["hub\nappends", "claim\nappends", "pre-checked\nclaim appends", "verify"]
    values = [
        e["hub_appends_per_s"],
        e["claim_appends_per_s"],
        e["prechecked_claim_appends_per_s"],
        e["verifies_per_s"],
    ]
    targets = [TARGET_APPENDS_PER_S] * 3 + [TARGET_VERIFIES_PER_S]
    ax1.bar(names, values, color=["tab:blue", "tab:cyan", "tab:purple", "tab:green"])
    ax1.scatter(names, targets, color="red", marker="_", s=800, label="target", zorder=3)
    ax1.set_ylabel("entries / s")
    ax1.set_title("embedded ledger (SQLite)")
    ax1.legend()
    gas_names = ["post root", "claim", "anchor", "fund"]
    gas_values = [
        v["gas_post_root_later"] or v["gas_post_root_first"],
        v["gas_claim_later"] or v["gas_claim_first"],
        v["gas_anchor"],
        v["gas_fund"],
    ]
    ax2.bar(gas_names, gas_values, color="tab:orange")
    ax2.set_ylabel("gas")
    ax2.set_title("EVM settlement (anvil)")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (CI, ~20 s)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/ledger.json"))
    parser.add_argument("--entries", type=int, default=None)
    parser.add_argument("--batch", type=int, default=1000)
    args = parser.parse_args()
    entries = args.entries or (10_000 if args.quick else 100_000)
    load_at_start = os.getloadavg()[0]
    nodes, epochs = (32, 3) if args.quick else (128, 5)
    single = 300 if args.quick else 2000
    with Progress(console=console, transient=True) as progress:
        embedded = bench_embedded(entries, args.batch, single, progress)
        evm = bench_evm(nodes, epochs, progress)
        audit = bench_audit_cost(progress, 3 if args.quick else 10)
    machine = (
        f"{platform.machine()}, {os.cpu_count()} cores, load average {load_at_start:.2f} "
        f"at start, Python {platform.python_version()}"
    )
    result = {
        "machine": machine,
        "quick": args.quick,
        "embedded": embedded,
        "evm": evm,
        "audit": audit,
    }
    command = "python bench/ledger.py " + " ".join(sys.argv[1:])
    write_outputs(result, args.out, command)
    console.print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
