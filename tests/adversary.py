"""A hostile peer for the adversary suite (tests/test_adversary.py): it joins a run with its own key and, every
period until killed, performs the attacks of issue 14 with the project's own protocol code.

    python tests/adversary.py --peer MADDR --run RUN_ID --store DIR --work DIR [--period 1]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

FAR_FUTURE = 10 * 365 * 86400.0
HUGE_BYTES = 40 << 20  # over the bound of a unet-tiny checkpoint (~29 MiB) and release (~36 MiB: with its final one)


class Adversary:
    def __init__(self, swarm, manifest, store, work: Path):
        self.swarm, self.m, self.store, self.work = swarm, manifest, store, work
        self.round = 0
        self.artifacts: dict[str, tuple[str, str, dict]] = {}

    def publish(self, name: str, files: dict[str, bytes]) -> tuple[str, str, dict]:
        """A folder of `files` published to the run's store: (repo, revision, {path: sha256})."""
        from isles.protocol.artifacts import folder_files

        if name not in self.artifacts:
            folder = self.work / name
            folder.mkdir(parents=True, exist_ok=True)
            for path, data in files.items():
                (folder / path).write_bytes(data)
            repo = f"{self.m.run_id}-hostile-{name}"
            self.artifacts[name] = (repo, self.store.publish(repo, folder), folder_files(folder))
        return self.artifacts[name]

    def attack(self) -> None:
        self.round += 1
        honest = self.honest_peers()
        for unit in self.m.units:
            for step in (
                self.claim_every_unit_backdated,
                self.forge_claims,
                self.point_at_bad_checkpoints,
                self.release_fakes,
            ):
                try:
                    step(unit, honest)
                except Exception as exc:  # keep attacking whatever fails
                    print(f"hostile: {step.__name__} on {unit}: {type(exc).__name__}: {exc}", flush=True)
        self.fake_authority(honest)

    def honest_peers(self) -> list[str]:
        peers = {p.peer_id for p in self.swarm.get_presence(self.m.run_id)}
        for unit in self.m.units:
            peers |= {e.record.peer_id for e in self.swarm.get_claims(self.m.run_id, unit)}
        return sorted(peers - {self.swarm.peer_id})

    # -- leases ------------------------------------------------------------------------------------------------------

    def claim_every_unit_backdated(self, unit: str, honest: list[str]) -> None:
        """Dated 1970, a fresh attempt every round, renewed every period: the earliest claim, forever."""
        from isles.protocol.records import Claim
        from isles.protocol.swarm import dht_time

        now = dht_time()
        claim = Claim(
            run_id=self.m.run_id,
            unit=unit,
            peer_id=self.swarm.peer_id,
            attempt=self.round,
            claimed_time=0.0,
            heartbeat_time=now,
        )
        self.swarm.put_claim(claim, now + 60.0)

    def forge_claims(self, unit: str, honest: list[str]) -> None:
        """A claim in an honest peer's name, and one that lives for ten years."""
        from isles.protocol import keys
        from isles.protocol.records import Claim
        from isles.protocol.swarm import dht_time

        now = dht_time()
        for peer_id in honest[:2]:
            claim = Claim(
                run_id=self.m.run_id, unit=unit, peer_id=peer_id, claimed_time=0.0, heartbeat_time=now, attempt=99
            )
            self.swarm._store(keys.claims_key(self.m.run_id, unit), claim.to_value(), now + 60, self.swarm.subkey("x"))
        squat = Claim(
            run_id=self.m.run_id, unit=unit, peer_id=self.swarm.peer_id, claimed_time=0.0, heartbeat_time=now
        )
        self.swarm._store(
            keys.claims_key(self.m.run_id, unit), squat.to_value(), now + FAR_FUTURE, self.swarm.subkey("y")
        )

    # -- checkpoints -------------------------------------------------------------------------------------------------

    def point_at_bad_checkpoints(self, unit: str, honest: list[str]) -> None:
        """Pointers at the last step (our weights, to be published under an honest signature), at step 10^12, at a
        state that does not load, at a file too large, and one naming an honest peer as its writer."""
        from isles.protocol import keys
        from isles.protocol.records import CheckpointPointer, FencingToken
        from isles.protocol.swarm import dht_time, recipe_steps

        steps = recipe_steps(self.m, unit)
        garbage = self.publish("garbage-ckpt", {"ckpt-000000005.isles": os.urandom(4096)})
        finished = self.publish("finished-ckpt", {f"ckpt-{steps:09d}.isles": os.urandom(4096)})
        huge = self.publish("huge-ckpt", {"ckpt-000000003.isles": b"\0" * HUGE_BYTES})
        now = dht_time()
        token = FencingToken(unit=unit, attempt=1, owner=self.swarm.peer_id, claimed_time=0.0)
        for i, ((repo, revision, files), step) in enumerate(
            [(finished, steps), (finished, 10**12), (garbage, 5), (huge, 3)]
        ):
            pointer = CheckpointPointer(
                run_id=self.m.run_id,
                unit=unit,
                token=token,
                repo=repo,
                revision=revision,
                files=files,
                step=step,
                steps=steps,
                written_time=now,
            )
            self.swarm._store(
                keys.checkpoints_key(self.m.run_id, unit), pointer.to_value(), now + 3600, self.swarm.subkey(f"{i}")
            )
        for peer_id in honest[:1]:
            forged = CheckpointPointer(
                run_id=self.m.run_id,
                unit=unit,
                token=token.copy(update=dict(owner=peer_id)),
                repo=garbage[0],
                revision=garbage[1],
                files=garbage[2],
                step=steps - 1,
                steps=steps,
                written_time=now,
            )
            self.swarm.put_checkpoint(forged)

    # -- releases ----------------------------------------------------------------------------------------------------

    def release_fakes(self, unit: str, honest: list[str]) -> None:
        """A release whose config allocates huge layers, one too large to download, one in an honest peer's name,
        one dated at time 0 (first by stated time), and one that lives for ten years."""
        from isles.protocol import keys
        from isles.protocol.records import FencingToken, Release

        if unit == "router":
            return
        repo, revision, files = self.publish(f"bloated-{unit}", self.bloated_expert(unit))
        huge = self.publish(
            "huge-release", {"config.json": b"{}", "diffusion_pytorch_model.safetensors": b"\0" * HUGE_BYTES}
        )
        token = FencingToken(unit=unit, attempt=self.round, owner=self.swarm.peer_id, claimed_time=0.0)
        steps = self.m.experts[int(unit.rsplit("-", 1)[1])].steps
        for (repo_, revision_, files_), owner, volunteer in (
            ((repo, revision, files), self.swarm.peer_id, "hostile"),
            (huge, self.swarm.peer_id, honest[0] if honest else "hostile"),
            ((repo, revision, files), honest[0] if honest else self.swarm.peer_id, "honest-looking"),
        ):
            release = Release(
                run_id=self.m.run_id,
                unit=unit,
                token=token.copy(update=dict(owner=owner)),
                repo=repo_,
                revision=revision_,
                files=files_,
                steps=steps,
                released_time=0.0,
                volunteer=volunteer,
            )
            self.swarm.put_release(release)
        from isles.protocol.swarm import dht_time

        squat = Release(
            run_id=self.m.run_id,
            unit=unit,
            token=token,
            repo=repo,
            revision=revision,
            files=files,
            steps=steps,
            released_time=0.0,
        )
        self.swarm._store(
            keys.releases_key(self.m.run_id, unit), squat.to_value(), dht_time() + FAR_FUTURE, self.swarm.subkey("far")
        )

    def bloated_expert(self, unit: str) -> dict[str, bytes]:
        from isles.experts.presets import build_model

        r = self.m.experts[int(unit.rsplit("-", 1)[1])]
        folder = self.work / f"model-{unit}"
        build_model(r.preset, r.channels, r.resolution, r.num_classes).save_pretrained(folder)
        config = json.loads((folder / "config.json").read_text())
        config["time_embedding_dim"] = 1 << 20  # a few KB of JSON, gigabytes of layers at construction
        return {
            "config.json": json.dumps(config).encode(),
            "diffusion_pytorch_model.safetensors": (folder / "diffusion_pytorch_model.safetensors").read_bytes(),
        }

    # -- the run authority ---------------------------------------------------------------------------------------

    def fake_authority(self, honest: list[str]) -> None:
        """An ensemble saying the run is complete with our releases, and rejections of every honest release."""
        from isles.protocol.records import Ensemble, FencingToken, Rejection
        from isles.protocol.swarm import dht_time

        tokens = [
            FencingToken(unit=u, attempt=1, owner=self.swarm.peer_id, claimed_time=0.0) for u in self.m.units[:-1]
        ]
        repo, revision, files = self.artifacts.get("bloated-expert-0") or self.publish("garbage-ckpt", {})
        self.swarm.put_ensemble(
            Ensemble(
                run_id=self.m.run_id,
                repo=repo,
                revision=revision,
                files=files,
                experts=tokens,
                router=None,
                complete=True,
                published_time=dht_time() + 3600,
                peer_id=self.swarm.peer_id,
            )
        )
        for unit in self.m.units:
            for release in self.swarm.get_releases(self.m.run_id, unit):
                if release.token.owner != self.swarm.peer_id:
                    self.swarm.put_rejection(
                        Rejection(
                            run_id=self.m.run_id,
                            unit=unit,
                            token=release.token,
                            revision=release.revision,
                            reason="hostile says no",
                            rejected_time=dht_time(),
                            peer_id=self.swarm.peer_id,
                        )
                    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--peer", required=True)
    parser.add_argument("--run", required=True)
    parser.add_argument("--store", required=True)
    parser.add_argument("--work", required=True, type=Path)
    parser.add_argument("--period", type=float, default=1.0)
    args = parser.parse_args()

    from isles.protocol.artifacts import open_store
    from isles.protocol.dht import DHTConfig, open_dht
    from isles.protocol.swarm import Swarm

    node = open_dht(DHTConfig(initial_peers=(args.peer,), host_maddrs=("/ip4/127.0.0.1/tcp/0",)))
    swarm = Swarm(node)
    manifest = None
    while manifest is None:  # the manifest may take a moment to reach us
        manifest = swarm.get_manifest(args.run)
        time.sleep(0.0 if manifest else 0.5)
    adversary = Adversary(swarm, manifest, open_store(args.store), args.work)
    print(f"hostile peer {swarm.peer_id} attacking run {args.run}", flush=True)
    while True:
        adversary.attack()
        print(f"hostile: round {adversary.round} done", flush=True)
        time.sleep(args.period)  # a process that runs until the test kills it


if __name__ == "__main__":
    main()
