"""Shard files: rows streamed in by ShardWriter come back from lazy columns exactly, in any order, as a plain
safetensors file; equal content gives equal bytes; a failed write leaves nothing; a truncated file is refused."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from isles.experts.shard_file import LazyColumn, ShardFile, ShardWriter
from isles.protocol.errors import IslesError


def _write(path, items: torch.Tensor, text: torch.Tensor, batch: int = 7) -> str:
    writer = ShardWriter(path)
    for start in range(0, len(items), batch):
        writer.append(items=items[start : start + batch], text=text[start : start + batch])
    writer.set_extra("null_text", text[0])
    return writer.close({"isles": "{}"})


def test_rows_written_in_batches_read_back_lazily_in_any_order(tmp_path):
    torch.manual_seed(0)
    items, text = torch.randn(50, 2, 3, 3), torch.randn(50, 4, 5).half()
    digest = _write(tmp_path / "s.safetensors", items, text)
    assert digest == _write(tmp_path / "again.safetensors", items, text, batch=13)  # same content, same bytes
    f = ShardFile(tmp_path / "s.safetensors")
    column = f.column("items")
    assert isinstance(column, LazyColumn) and column.shape == (50, 2, 3, 3) and column.dtype == torch.float32
    for index in (torch.tensor([49, 0, 7, 7, 8, 9]), torch.arange(10, 20), torch.tensor([], dtype=torch.long)):
        assert torch.equal(column[index], items[index])
    assert torch.equal(column[3], items[3]) and torch.equal(column[:], items)
    view = column.take(torch.arange(20, 40)).take(torch.tensor([5, 1]))  # views of views read nothing until indexed
    assert torch.equal(view[:], items[[25, 21]])
    assert torch.equal(f.column("text")[torch.tensor([4, 2])], text[[4, 2]])
    assert torch.equal(f.tensor("null_text"), text[0])
    plain = load_file(tmp_path / "s.safetensors")  # any safetensors reader opens a shard
    assert torch.equal(plain["items"], items) and torch.equal(plain["text"], text)


def test_a_failed_write_leaves_nothing_and_a_truncated_file_is_refused(tmp_path):
    writer = ShardWriter(tmp_path / "s.safetensors")
    writer.append(items=torch.zeros(3, 2))
    with pytest.raises(IslesError, match="rows of"):
        writer.append(items=torch.zeros(3, 5))  # another row shape
    writer.abort()
    assert list(tmp_path.iterdir()) == []

    _write(tmp_path / "s.safetensors", torch.randn(10, 4), torch.randn(10, 2).half())
    data = (tmp_path / "s.safetensors").read_bytes()
    (tmp_path / "s.safetensors").write_bytes(data[:-16])
    with pytest.raises(IslesError, match="truncated"):
        ShardFile(tmp_path / "s.safetensors")
