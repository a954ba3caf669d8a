"""How well shard leases work under a race: N peers on 127.0.0.1 (one process, a hivemind DHT each) race for M shards.

Run: `python benchmarks/claims.py` (32 peers, 32 shards: a few minutes on 2 cores), `--peers 12 --shards 4`, `--json`.
Prints shards with more than one owner once every lease passed its confirming read (a settle period after it was
taken), leases lost at that read, claim latency p50 / p95 (until the lease a peer kept was taken: when a volunteer
starts training it), and seconds until every shard is owned.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import threading
import time
from collections import Counter

from isles.protocol.dht import DHTConfig, open_dht
from isles.protocol.leases import LeaseManager, LeaseSettings, owner_of
from isles.protocol.records import ExpertRecipe, RouterRecipe, RunManifest, ShardRef
from isles.protocol.swarm import Swarm, dht_time

LOOPBACK = ("/ip4/127.0.0.1/tcp/0",)


def bench_manifest(shards: int) -> RunManifest:
    from isles.protocol.identity import ephemeral_identity

    owner = ephemeral_identity()
    owner.forget_key_file()
    return RunManifest.create(
        signer=owner,
        name=f"claims-bench-{shards}-{time.time_ns()}",
        dataset="none",
        store="/tmp/isles-claims-bench",
        shards=[
            ShardRef(repo="s", revision="r", path=f"{i}", sha256="0" * 64, items=1, val_items=0, cluster=i)
            for i in range(shards)
        ],
        experts=[
            ExpertRecipe(preset="unet-tiny", channels=1, resolution=8, steps=1, global_batch=1, lr=1e-3)
            for _ in range(shards)
        ],
        router=RouterRecipe(preset="router-tiny", steps=1, global_batch=1, lr=1e-3),
    )


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def run(num_peers: int, num_shards: int, settings: LeaseSettings, log=print) -> dict:
    t0 = time.monotonic()
    nodes = [open_dht(DHTConfig(host_maddrs=LOOPBACK))]
    first = tuple(nodes[0].visible_maddrs())
    for _ in range(num_peers - 1):
        nodes.append(open_dht(DHTConfig(initial_peers=first, host_maddrs=LOOPBACK)))
    start_s = time.monotonic() - t0
    log(f"started {num_peers} peers in {start_s:.1f} s ({start_s / num_peers:.2f} s each)")
    try:
        swarms = [Swarm(node) for node in nodes]
        manifest = bench_manifest(num_shards)
        swarms[0].publish_manifest(manifest)
        for swarm in swarms:
            swarm.node.register_run(manifest)
        shards = manifest.units[:num_shards]
        managers = [LeaseManager(swarm, manifest.run_id, settings, new_to_run=True) for swarm in swarms]
        leases: list = [None] * num_peers
        latency: list[float | None] = [None] * num_peers
        barrier = threading.Barrier(num_peers + 1)

        lost_after_settle = [0] * num_peers

        def claim(i: int) -> None:
            barrier.wait()
            began = time.monotonic()
            while (lease := managers[i].acquire(shards)) is not None:
                acquired = time.monotonic() - began
                # A volunteer starts training now; a racer's write slower than the settle period shows up in the
                # lease's confirming read a settle period later, and the loser claims again: count the lease kept.
                lease.confirmed.wait(settings.settle_period + 60)
                if not lease.lost.is_set():
                    leases[i], latency[i] = lease, acquired
                    return
                lost_after_settle[i] += 1
                lease.withdraw()

        threads = [threading.Thread(target=claim, args=(i,), daemon=True) for i in range(num_peers)]
        for thread in threads:
            thread.start()
        barrier.wait()
        race_began = time.monotonic()
        for thread in threads:
            thread.join()
        race_s = time.monotonic() - race_began

        won = [lease for lease in leases if lease is not None]
        holders = Counter(lease.unit for lease in won)
        now = dht_time()
        seen_owners = {}
        for shard in shards:  # what an outside reader sees after everyone settled
            owner = owner_of(swarms[-1].get_claims(manifest.run_id, shard), now)
            seen_owners[shard] = owner.record.peer_id if owner else None
        latencies = sorted(t for t in latency if t is not None)
        all_owned = all(seen_owners.values()) and len(holders) == num_shards
        result = {
            "peers": num_peers,
            "shards": num_shards,
            "ttl_period": settings.ttl_period,
            "heartbeat_period": settings.heartbeat_period,
            "settle_period": settings.settle_period,
            "peers_start_s": round(start_s, 2),
            "leases_won": len(won),
            "shards_owned": sum(1 for v in seen_owners.values() if v),
            "duplicate_owners": sum(1 for count in holders.values() if count > 1),
            "leases_lost_after_settle": sum(lost_after_settle),
            "claim_p50_s": _round(percentile(latencies, 50)),
            "claim_p95_s": _round(percentile(latencies, 95)),
            "all_owned_s": _round(max(latencies)) if all_owned and latencies else None,
            "race_s": round(race_s, 2),
        }
        for manager in managers:
            manager.close()
        return result
    finally:
        for node in nodes:
            node.shutdown()


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=32, help="peers racing (default 32)")
    parser.add_argument("--shards", type=int, default=32, help="shards to claim (default 32)")
    parser.add_argument("--ttl", type=float, default=60.0, help="lease TTL in seconds")
    parser.add_argument("--heartbeat", type=float, default=15.0, help="heartbeat period in seconds")
    parser.add_argument("--settle", type=float, default=3.0, help="settle period in seconds")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    for name in ("hivemind", "p2p"):
        logging.getLogger(name).setLevel(logging.ERROR)
    settings = LeaseSettings(ttl_period=args.ttl, heartbeat_period=args.heartbeat, settle_period=args.settle)
    result = run(args.peers, args.shards, settings, log=lambda msg: print(msg, file=sys.stderr))
    if args.json:
        print(json.dumps(result, sort_keys=True))
        return
    rows = [
        ("peers / shards", f"{result['peers']} / {result['shards']}"),
        ("ttl / heartbeat / settle (s)", f"{args.ttl:g} / {args.heartbeat:g} / {args.settle:g}"),
        ("peers started in (s)", result["peers_start_s"]),
        ("leases won", result["leases_won"]),
        ("shards owned (reader's view)", result["shards_owned"]),
        ("shards with more than one owner", result["duplicate_owners"]),
        ("leases lost at the confirming read", result["leases_lost_after_settle"]),
        ("claim latency p50 (s)", result["claim_p50_s"]),
        ("claim latency p95 (s)", result["claim_p95_s"]),
        ("every shard owned after (s)", result["all_owned_s"]),
    ]
    width = max(len(name) for name, _ in rows)
    print(f"| {'metric':<{width}} | value |\n|{'-' * (width + 2)}|-------|")
    for name, value in rows:
        print(f"| {name:<{width}} | {value} |")


if __name__ == "__main__":
    main()
