"""Artifact stores: one behaviour suite run against the local store and the Hub store (real huggingface_hub client
talking to tests/hub_server.py, in "regular" and plain-LFS upload modes), plus faults, tampering and bad input."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from hub_server import HubServer, hub_server  # noqa: F401 (fixture)
from safetensors.numpy import load_file, save_file

from isles.protocol.artifacts import (
    ArtifactError,
    ArtifactNotFound,
    IntegrityError,
    StoreUnavailable,
    check_loadable,
    folder_files,
    open_store,
)
from isles.protocol.errors import IslesError
from isles.protocol.store_hub import HubStore
from isles.protocol.store_local import LocalStore

TOKEN = "hf_testtoken_do_not_leak"


def make_expert(folder: Path, seed: int = 0, mb: float = 3.0) -> Path:
    """A diffusers-like expert folder: a multi-MB safetensors file and a config.json."""
    rng = np.random.default_rng(seed)
    (folder / "expert_0").mkdir(parents=True, exist_ok=True)
    save_file({"weight": rng.standard_normal(int(mb * (1 << 20) / 4)).astype(np.float32)},
              str(folder / "expert_0" / "diffusion_pytorch_model.safetensors"))  # fmt: skip
    (folder / "expert_0" / "config.json").write_text(json.dumps({"seed": seed, "sample_size": 8}))
    (folder / "ensemble.json").write_text(json.dumps({"experts": ["expert_0"], "seed": seed}))
    return folder


@pytest.fixture(params=["local", "hub-regular", "hub-lfs"])
def store_case(request, tmp_path, hub_server):  # noqa: F811
    """(store, server or None): the same tests run against every store."""
    if request.param == "local":
        return LocalStore(tmp_path / "store"), None
    hub_server.upload_mode = request.param.removeprefix("hub-")
    return HubStore("alice", token=TOKEN, endpoint=hub_server.url, backoff_period=0.01), hub_server


def tamper_stored(store, server, repo: str, revision: str, path: str) -> None:
    """Make the store serve bytes that differ from what was published."""
    if server is not None:
        server.tamper.add(path)
        return
    target = store.root / "models" / repo / "revisions" / revision / path
    os.chmod(target, 0o644)
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))


def leftovers(parent: Path, name: str) -> list[str]:
    return [p.name for p in parent.iterdir() if name in p.name]


# Behaviour shared by every store --------------------------------------------------------------------------------


def test_publish_then_pull_round_trip(store_case, tmp_path):
    store, _ = store_case
    src = make_expert(tmp_path / "src")
    files = folder_files(src)
    revision = store.publish("run1-ensemble", src, message="first")

    assert store.exists("run1-ensemble") and store.exists("run1-ensemble", revision)
    assert store.list_revisions("run1-ensemble") == [revision]
    dest = store.pull("run1-ensemble", revision, tmp_path / "pulled", files)
    assert folder_files(dest) == files
    weights = load_file(str(dest / "expert_0" / "diffusion_pytorch_model.safetensors"))["weight"]
    assert weights.nbytes >= 3 << 20
    assert store.read_json("run1-ensemble", revision, "ensemble.json", files["ensemble.json"]) == {
        "experts": ["expert_0"],
        "seed": 0,
    }
    assert leftovers(tmp_path, ".pulled.") == []


def test_republishing_unchanged_content_makes_no_new_revision(store_case, tmp_path):
    store, _ = store_case
    src = make_expert(tmp_path / "src")
    first = store.publish("run1-expert-0", src)
    assert store.publish("run1-expert-0", src) == first
    assert store.list_revisions("run1-expert-0") == [first]


def test_revisions_are_immutable_and_listed_oldest_first(store_case, tmp_path):
    store, _ = store_case
    src = make_expert(tmp_path / "src", seed=0, mb=0.5)
    first = store.publish("run1-expert-0", src)
    old_files = folder_files(src)
    make_expert(src, seed=1, mb=0.5)
    (src / "ensemble.json").unlink()  # the new revision holds exactly the folder: this file is gone from it
    second = store.publish("run1-expert-0", src, message="step 200")
    assert second != first
    assert store.list_revisions("run1-expert-0") == [first, second]

    # The old revision still serves its own bytes; the new one no longer has the deleted file.
    assert folder_files(store.pull("run1-expert-0", first, tmp_path / "old", old_files)) == old_files
    new = store.pull("run1-expert-0", second, tmp_path / "new", folder_files(src))
    assert not (new / "ensemble.json").exists()
    with pytest.raises(ArtifactNotFound):
        store.pull("run1-expert-0", second, tmp_path / "gone", {"ensemble.json": old_files["ensemble.json"]})
    assert not (tmp_path / "gone").exists()


def test_pull_file_fetches_one_verified_file(store_case, tmp_path):
    store, _ = store_case
    src = make_expert(tmp_path / "src", mb=1)
    files = folder_files(src)
    revision = store.publish("run1-shards", src, kind="dataset")
    path = "expert_0/diffusion_pytorch_model.safetensors"
    dest = store.pull_file("run1-shards", revision, path, tmp_path / "shard-0.safetensors", files[path], "dataset")
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == files[path]
    # Models and datasets are separate namespaces, as on the Hub.
    assert store.exists("run1-shards", kind="dataset") and not store.exists("run1-shards", kind="model")


def test_pull_reuses_a_verified_destination(store_case, tmp_path):
    store, server = store_case
    src = make_expert(tmp_path / "src", mb=0.5)
    files = folder_files(src)
    revision = store.publish("r", src)
    store.pull("r", revision, tmp_path / "pulled", files)
    if server is not None:
        before = len(server.requests)
        store.pull("r", revision, tmp_path / "pulled", files)
        assert len(server.requests) == before  # nothing downloaded again


def test_tampered_bytes_are_refused_and_nothing_is_left(store_case, tmp_path):
    store, server = store_case
    src = make_expert(tmp_path / "src")
    files = folder_files(src)
    revision = store.publish("run1-expert-0", src)
    path = "expert_0/diffusion_pytorch_model.safetensors"
    tamper_stored(store, server, "run1-expert-0", revision, path)

    with pytest.raises(IntegrityError) as err:
        store.pull("run1-expert-0", revision, tmp_path / "pulled", files)
    assert path in err.value.message and "record" in err.value.message and err.value.hint
    assert not (tmp_path / "pulled").exists()
    assert leftovers(tmp_path, "pulled") == []

    with pytest.raises(IntegrityError):
        store.pull_file("run1-expert-0", revision, path, tmp_path / "one.safetensors", files[path])
    assert leftovers(tmp_path, "one.safetensors") == []


def test_a_record_that_disagrees_is_refused_and_the_old_destination_kept(store_case, tmp_path):
    store, _ = store_case
    first_src = make_expert(tmp_path / "a", seed=0, mb=0.2)
    first = store.publish("r", first_src)
    dest = store.pull("r", first, tmp_path / "pulled", folder_files(first_src))
    second_src = make_expert(tmp_path / "b", seed=1, mb=0.2)
    second = store.publish("r", second_src)

    wrong = dict(folder_files(second_src), **{"ensemble.json": "0" * 64})
    with pytest.raises(IntegrityError, match="ensemble.json"):
        store.pull("r", second, dest, wrong)
    assert folder_files(dest) == folder_files(first_src)  # the previous verified pull is untouched
    with pytest.raises(IntegrityError):
        store.read_json("r", second, "ensemble.json", "0" * 64)


def test_missing_repo_and_revision_are_clear_errors(store_case, tmp_path):
    store, _ = store_case
    files = {"config.json": "0" * 64}
    with pytest.raises(ArtifactNotFound) as err:
        store.pull("no-such-repo", "a" * 40, tmp_path / "x", files)
    assert "no-such-repo" in err.value.message and err.value.hint
    with pytest.raises(ArtifactNotFound):
        store.list_revisions("no-such-repo")
    assert not store.exists("no-such-repo")

    revision = store.publish("r", make_expert(tmp_path / "src", mb=0.1))
    with pytest.raises(ArtifactNotFound) as err:
        store.pull("r", "b" * 40, tmp_path / "x", files)
    assert "revision" in err.value.message and err.value.hint
    assert store.exists("r", revision) and not store.exists("r", "b" * 40)
    assert not (tmp_path / "x").exists() and leftovers(tmp_path, ".x.") == []  # no partial-download folder either


def test_files_left_by_an_interrupted_pull_do_not_join_the_next_one(store_case, tmp_path):
    store, _ = store_case
    src = make_expert(tmp_path / "src", mb=0.1)
    files = folder_files(src)
    revision = store.publish("r", src)
    stale = tmp_path / ".pulled.isles-partial" / "expert_9"  # an earlier pull of another revision, cut short
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{}")
    dest = store.pull("r", revision, tmp_path / "pulled", files)
    assert folder_files(dest) == files
    assert leftovers(tmp_path, ".pulled.") == []


# Hub-specific: faults on the wire, tokens ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["regular", "lfs"])
def test_publish_survives_failed_and_dropped_requests(hub_server, tmp_path, mode):  # noqa: F811
    hub_server.upload_mode = mode
    store = HubStore("alice", token=TOKEN, endpoint=hub_server.url, backoff_period=0.01)
    src = make_expert(tmp_path / "src")
    hub_server.fail("/preupload/", times=1, status=500)
    hub_server.drop("/commit/", times=1)
    hub_server.fail("/commit/", times=1, status=503)
    if mode == "lfs":
        hub_server.drop("PUT /lfs-upload/", times=1)
        hub_server.fail("/info/lfs/objects/batch", times=1, status=502)

    revision = store.publish("run1-expert-0", src)
    assert store.list_revisions("run1-expert-0") == [revision]  # one good revision, no partial commit
    assert all(f.times == 0 for f in hub_server.faults)  # every injected fault was hit
    files = folder_files(src)
    assert set(hub_server.repo("alice/run1-expert-0").resolve(revision).files) == {*files, ".gitattributes"}
    assert folder_files(store.pull("run1-expert-0", revision, tmp_path / "pulled", files)) == files


def test_publish_that_keeps_failing_leaves_no_revision(hub_server, tmp_path):  # noqa: F811
    store = HubStore("alice", token=TOKEN, endpoint=hub_server.url, retries=2, backoff_period=0.01)
    hub_server.fail("/commit/", times=100, status=500)
    with pytest.raises(StoreUnavailable) as err:
        store.publish("run1-expert-0", make_expert(tmp_path / "src", mb=0.2))
    assert err.value.hint and TOKEN not in err.value.message
    assert store.list_revisions("run1-expert-0") == []
    assert set(hub_server.repo("alice/run1-expert-0").resolve("main").files) == {".gitattributes"}


def test_a_rejected_request_is_not_retried(hub_server, tmp_path):  # noqa: F811
    store = HubStore("alice", token=TOKEN, endpoint=hub_server.url, backoff_period=0.01)
    hub_server.fail("/commit/", times=1, status=400)
    with pytest.raises(ArtifactError, match="400") as err:
        store.publish("r", make_expert(tmp_path / "src", mb=0.1))
    assert err.value.hint and sum("/commit/" in r for r in hub_server.requests) == 1
    assert store.list_revisions("r") == []


def test_pull_resumes_after_a_dropped_download(hub_server, tmp_path):  # noqa: F811
    store = HubStore("alice", token=TOKEN, endpoint=hub_server.url, backoff_period=0.01)
    src = make_expert(tmp_path / "src")
    files = folder_files(src)
    revision = store.publish("r", src)
    hub_server.drop("GET /alice/r/resolve/", times=2)
    hub_server.fail("HEAD /alice/r/resolve/", times=1, status=500)
    assert folder_files(store.pull("r", revision, tmp_path / "pulled", files)) == files
    assert all(f.times == 0 for f in hub_server.faults)

    # Most of the body arrives, then the connection dies: the client asks for the rest (it writes 10 MiB chunks, so the
    # file must be larger than that for anything to be kept).
    big = make_expert(tmp_path / "big", mb=12)
    path = "expert_0/diffusion_pytorch_model.safetensors"
    files = folder_files(big)
    revision = store.publish("r", big)
    hub_server.cut_downloads = 1
    store.pull_file("r", revision, path, tmp_path / "w.safetensors", files[path])
    assert hub_server.cut_downloads == 0 and folder_files(tmp_path)["w.safetensors"] == files[path]
    assert any(r.startswith("bytes=") and not r.startswith("bytes=0-") for r in hub_server.ranges), hub_server.ranges


def test_writes_need_a_token_that_never_leaks(hub_server, tmp_path, monkeypatch):  # noqa: F811
    import huggingface_hub.constants

    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    src = make_expert(tmp_path / "src", mb=0.1)

    anonymous = HubStore("alice", endpoint=hub_server.url)
    with pytest.raises(IslesError, match="no Hugging Face token"):
        anonymous.check_writable()  # before any training: the volunteer learns now, not after hours
    with pytest.raises(IslesError) as err:
        anonymous.publish("r", src)
    assert "token" in err.value.message and "hf auth login" in err.value.hint

    hub_server.token = "hf_the_right_one"
    wrong = HubStore("alice", token=TOKEN, endpoint=hub_server.url, backoff_period=0.01)
    with pytest.raises(IslesError) as err:
        wrong.publish("r", src)
    assert "401" in err.value.message and "hf auth login" in err.value.hint
    assert TOKEN not in f"{err.value.message} {err.value.hint} {wrong!r} {vars(err.value)}"

    monkeypatch.setenv("HF_TOKEN", "hf_the_right_one")  # picked up like huggingface_hub's own login
    revision = HubStore("alice", endpoint=hub_server.url).publish("r", src)
    assert anonymous.exists("r", revision)  # reads need no token


# URIs and bad input ----------------------------------------------------------------------------------------------


def test_open_store_parses_uris(tmp_path):
    assert isinstance(open_store(tmp_path / "s"), LocalStore)
    assert open_store(f"file://{tmp_path}/s").root == tmp_path / "s"
    hub = open_store("hf://alice", token=TOKEN, endpoint="http://127.0.0.1:9")
    assert isinstance(hub, HubStore) and hub.repo_id("x") == "alice/x" and hub.repo_id("bob/y") == "bob/y"
    assert TOKEN not in repr(hub)
    for bad in ("s3://bucket/x", "gs://x", ""):
        with pytest.raises(IslesError) as err:
            open_store(bad)
        assert "hf://" in err.value.hint
    with pytest.raises(IslesError, match="invalid repo name"):
        open_store(tmp_path).publish("../escape", tmp_path)
    with pytest.raises(IslesError, match="only safetensors and JSON"):
        check_loadable("expert_0/pytorch_model.bin")
    check_loadable("expert_0/diffusion_pytorch_model.safetensors")
    with pytest.raises(IslesError, match="invalid file path"):
        open_store(tmp_path).pull("r", "a" * 40, tmp_path / "d", {"../x": "0" * 64})


def test_local_concurrent_publishers_make_one_revision(tmp_path):
    store = LocalStore(tmp_path / "store")
    src = make_expert(tmp_path / "src", mb=1)
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(store.publish("r", src))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(set(results)) == 1 and store.list_revisions("r") == results[:1]
    assert not [p for p in (tmp_path / "store" / "models" / "r" / "revisions").iterdir() if p.name.startswith(".")]
