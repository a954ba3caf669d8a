"""Opt-in test against the real Hugging Face Hub: what the fake server cannot show (xet transfers, auth, limits).

Skipped unless a token (HF_TOKEN or `hf auth login`) and network are present. Run it with
`HF_TOKEN=hf_... pytest tests/test_store_hub_live.py -m hub -q`; it creates a private model repo and deletes it.
"""

from __future__ import annotations

import json
import socket
import uuid

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from isles.protocol.artifacts import IntegrityError, folder_files, open_store

pytestmark = pytest.mark.hub


def _hub_reachable() -> bool:
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
        return True
    except OSError:
        return False


@pytest.fixture
def live_repo():
    """(api, namespace, repo name) for a fresh private repo that is deleted afterwards."""
    from huggingface_hub import HfApi, get_token

    token = get_token()
    if not token:
        pytest.skip("no Hugging Face token (set HF_TOKEN or run `hf auth login`)")
    if not _hub_reachable():
        pytest.skip("huggingface.co is not reachable")
    api = HfApi(token=token)
    namespace = api.whoami()["name"]
    name = f"isles-store-test-{uuid.uuid4().hex[:8]}"
    api.create_repo(f"{namespace}/{name}", private=True)
    try:
        yield api, namespace, name
    finally:
        api.delete_repo(f"{namespace}/{name}", missing_ok=True)


def test_publish_and_pull_on_the_real_hub(live_repo, tmp_path):
    api, namespace, name = live_repo
    src = tmp_path / "src"
    src.mkdir()
    save_file({"w": np.arange(1 << 20, dtype=np.float32)}, str(src / "model.safetensors"))  # 4 MiB, goes to xet
    (src / "config.json").write_text(json.dumps({"hello": "hub"}))
    files = folder_files(src)

    store = open_store(f"hf://{namespace}")
    assert api.token not in repr(store)
    revision = store.publish(name, src, message="isles live test")
    assert store.publish(name, src) == revision  # unchanged content: no new commit
    assert store.list_revisions(name) == [revision]
    assert store.exists(name, revision)

    dest = store.pull(name, revision, tmp_path / "pulled", files)
    assert folder_files(dest) == files
    assert load_file(str(dest / "model.safetensors"))["w"][-1] == (1 << 20) - 1
    assert store.read_json(name, revision, "config.json", files["config.json"]) == {"hello": "hub"}

    with pytest.raises(IntegrityError):
        store.pull(name, revision, tmp_path / "bad", {**files, "config.json": "0" * 64})
    assert not (tmp_path / "bad").exists()
