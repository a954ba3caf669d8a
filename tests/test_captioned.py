"""Captioned image streams: image folders (metadata.jsonl or .txt captions), WebDataset tar shards and hf: sources
(a local imagefolder read by `datasets` in streaming mode, offline), with bad images skipped and counted."""

from __future__ import annotations

import io
import json
import logging
import sys
import tarfile

import pytest
import torch
from PIL import Image

from isles.experts import captioned
from isles.experts.captioned import expand_braces, open_captioned
from isles.protocol.errors import IslesError

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)]


def _image(i: int, size=(40, 20)) -> Image.Image:
    """Wide image: a solid colour in the middle square, black bars left and right (cut by the center crop)."""
    w, h = size
    im = Image.new("RGB", size, (0, 0, 0))
    im.paste(COLOURS[i % len(COLOURS)], ((w - h) // 2, 0, (w + h) // 2, h))
    return im


def _encoded(i: int, fmt: str) -> bytes:
    buf = io.BytesIO()
    _image(i).save(buf, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    return buf.getvalue()


def _centre_colour(pixels: torch.Tensor) -> tuple[int, ...]:
    return tuple(pixels[:, pixels.shape[1] // 2, pixels.shape[2] // 2].tolist())


def _metadata_folder(root, bad: bool = False):
    """root/{0,1,2}.png + root/sub/{a,b}.png, captions in root/metadata.jsonl and root/sub/metadata.jsonl."""
    (root / "sub").mkdir(parents=True)
    rows = []
    for i in range(3):
        _image(i).save(root / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"caption {i}", "label": i})
    _image(3).save(root / "sub" / "a.png")
    rows.append({"file_name": "sub/a.png", "text": "caption a"})  # subfolder file named from the root metadata
    _image(4).save(root / "sub" / "b.png")
    (root / "sub" / "metadata.jsonl").write_text(json.dumps({"file_name": "b.png", "prompt": "caption b"}) + "\n")
    if bad:
        (root / "bad.png").write_bytes(b"not an image at all")
        rows.append({"file_name": "bad.png", "text": "caption bad"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _write_tar(path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _shard(path, start: int) -> None:
    """Four samples: jpg+txt, png+json caption, webp+json text+cls, png+txt+json (txt wins)."""
    k = [f"{start + j:03d}" for j in range(4)]
    _write_tar(
        path,
        {
            f"{k[0]}.jpg": _encoded(0, "JPEG"),
            f"{k[0]}.txt": f" jpg {k[0]}\n".encode(),
            f"{k[1]}.png": _encoded(1, "PNG"),
            f"{k[1]}.json": json.dumps({"caption": f"png {k[1]}", "url": "x"}).encode(),
            f"{k[2]}.webp": _encoded(2, "WEBP"),
            f"{k[2]}.json": json.dumps({"text": f"webp {k[2]}"}).encode(),
            f"{k[2]}.cls": b"7",
            f"{k[3]}.png": _encoded(3, "PNG"),
            f"{k[3]}.txt": f"txt {k[3]}".encode(),
            f"{k[3]}.json": json.dumps({"caption": "not this one"}).encode(),
        },
    )


def test_folder_with_metadata_jsonl_in_sorted_order(tmp_path):
    _metadata_folder(tmp_path)
    stream = open_captioned(str(tmp_path), resolution=16)
    items = list(stream)
    assert [it.key for it in items] == ["0.png", "1.png", "2.png", "sub/a.png", "sub/b.png"]
    assert [it.caption for it in items] == ["caption 0", "caption 1", "caption 2", "caption a", "caption b"]
    assert [it.label for it in items] == [0, 1, 2, None, None]
    for i, it in enumerate(items):
        assert it.pixels.dtype == torch.uint8 and it.pixels.shape == (3, 16, 16)
        assert _centre_colour(it.pixels) == COLOURS[i]
        assert it.pixels.float().mean(0).min() > 200 or COLOURS[i].count(0) > 0  # the black bars were cropped off
    assert torch.equal(items[0].pixels, torch.tensor(COLOURS[0], dtype=torch.uint8).view(3, 1, 1).expand(3, 16, 16))
    assert stream.report.items == 5 and stream.report.skipped_undecodable == 0
    assert stream.description == f"folder {tmp_path} (metadata.jsonl)"


def test_folder_with_txt_captions_and_grayscale(tmp_path):
    for i, name in enumerate(["b", "a", "c"]):
        _image(i, size=(24, 24)).save(tmp_path / f"{name}.jpg")
        (tmp_path / f"{name}.txt").write_text(f"  a photo of {name}\n")
    stream = open_captioned(str(tmp_path), resolution=8, mode="L")
    items = list(stream)
    assert [(it.key, it.caption) for it in items] == [("a.jpg", "a photo of a"), ("b.jpg", "a photo of b"),
                                                      ("c.jpg", "a photo of c")]  # fmt: skip
    assert all(it.pixels.shape == (1, 8, 8) and it.label is None for it in items)
    assert stream.description == f"folder {tmp_path} (.txt captions)"


def test_undecodable_images_are_skipped_and_counted(tmp_path, caplog):
    _metadata_folder(tmp_path, bad=True)
    (tmp_path / "sub" / "c.png").write_bytes(_encoded(5, "PNG")[:60])  # truncated
    (tmp_path / "sub" / "c.txt").write_text("caption c")
    stream = open_captioned(str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="isles.data"):
        keys = [it.key for it in stream]
    assert keys == ["0.png", "1.png", "2.png", "sub/a.png", "sub/b.png"]
    assert stream.report.items == 5 and stream.report.skipped_undecodable == 2
    assert stream.report.skipped_examples == ["bad.png", "sub/c.png"]
    assert stream.report.summary() == "5 items, 2 undecodable images skipped (bad.png, sub/c.png)"
    assert sum("undecodable" in r.message for r in caplog.records) == 2


def test_an_image_without_a_caption_is_an_error_when_reached(tmp_path):
    _metadata_folder(tmp_path)
    _image(0).save(tmp_path / "sub" / "zz.png")  # after every captioned image
    stream = iter(open_captioned(str(tmp_path)))
    assert len([next(stream) for _ in range(5)]) == 5
    with pytest.raises(IslesError, match=r"sub/zz\.png has no caption") as err:
        next(stream)
    assert "metadata.jsonl" in err.value.hint


def test_limit_and_reiteration_restart_and_reset_the_report(tmp_path):
    _metadata_folder(tmp_path, bad=True)
    stream = open_captioned(str(tmp_path), limit=3)
    assert [it.key for it in stream] == ["0.png", "1.png", "2.png"]  # bad.png sorts after 2.png: not reached
    assert stream.report.items == 3 and stream.report.skipped_undecodable == 0
    stream.limit = None
    report = stream.report
    assert len(list(stream)) == 5 and report.items == 5 and report.skipped_undecodable == 1
    assert len(list(stream)) == 5 and report.items == 5 and report.skipped_examples == ["bad.png"]


def test_webdataset_tar_shard(tmp_path):
    _shard(tmp_path / "000.tar", 0)
    stream = open_captioned(str(tmp_path / "000.tar"), resolution=12)
    items = list(stream)
    assert [(it.key, it.caption, it.label) for it in items] == [
        ("000", "jpg 000", None),
        ("001", "png 001", None),
        ("002", "webp 002", 7),
        ("003", "txt 003", None),
    ]
    assert all(it.pixels.shape == (3, 12, 12) for it in items)
    assert [_centre_colour(it.pixels) for it in items[1:]] == COLOURS[1:4]  # lossless ones exactly
    assert stream.report.summary() == "4 items"


def test_brace_pattern_and_shard_folder_read_shards_in_order(tmp_path):
    _shard(tmp_path / "00000.tar", 0)
    _shard(tmp_path / "00001.tar", 4)
    pattern = str(tmp_path / "{00000..00001}.tar")
    assert expand_braces(pattern) == [str(tmp_path / "00000.tar"), str(tmp_path / "00001.tar")]
    assert expand_braces("s{8..10}-{a,b}") == ["s8-a", "s8-b", "s9-a", "s9-b", "s10-a", "s10-b"]
    keys = [it.key for it in open_captioned(pattern)]
    assert keys == [f"{i:03d}" for i in range(8)]
    assert [it.key for it in open_captioned(str(tmp_path))] == keys  # a folder holding only shards
    assert [it.key for it in open_captioned(pattern, limit=5)] == keys[:5]
    with pytest.raises(IslesError, match="1 of 3 shards not found"):
        open_captioned(str(tmp_path / "{00000..00002}.tar"))


def test_tar_bad_image_oversized_member_and_missing_caption(tmp_path, monkeypatch):
    _write_tar(
        tmp_path / "a.tar",
        {
            "x/0.png": _encoded(0, "PNG"),
            "x/0.txt": b"ok",
            "x/1.jpg": b"garbage",
            "x/1.txt": b"bad image",
            "x/2.png": _encoded(1, "PNG") + b"\0" * 5000,  # over the (lowered) bound
            "x/2.txt": b"too big",
            "x/3.png": _encoded(2, "PNG"),
            "x/3.txt": b"fine",
        },
    )
    monkeypatch.setattr(captioned, "MAX_MEMBER_BYTES", 4000)
    stream = open_captioned(str(tmp_path / "a.tar"))
    assert [(it.key, it.caption) for it in stream] == [("x/0", "ok"), ("x/3", "fine")]
    assert (stream.report.skipped_undecodable, stream.report.skipped_oversized) == (1, 1)
    assert stream.report.skipped_examples == ["x/1"]
    _write_tar(tmp_path / "b.tar", {"0.png": _encoded(0, "PNG"), "0.json": b'{"url": "x"}'})
    with pytest.raises(IslesError, match=r"b\.tar: 0 has no caption \(members: json, png\)"):
        list(open_captioned(str(tmp_path / "b.tar")))


@pytest.fixture
def hf_offline(monkeypatch):
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)  # read at import: set the parsed values too
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_hf_source_streams_a_local_imagefolder(tmp_path, hf_offline):
    _metadata_folder(tmp_path, bad=True)
    (tmp_path / "sub" / "metadata.jsonl").unlink()  # datasets wants one caption column name across files
    with (tmp_path / "metadata.jsonl").open("a") as f:
        f.write(json.dumps({"file_name": "sub/b.png", "text": "caption b"}) + "\n")
    stream = open_captioned(f"hf:{tmp_path}", resolution=8)
    items = list(stream)
    # datasets' row order (here the metadata.jsonl order); keys are row indices, so the bad row 4 leaves a gap
    assert [(it.key, it.caption) for it in items] == [
        ("0", "caption 0"),
        ("1", "caption 1"),
        ("2", "caption 2"),
        ("3", "caption a"),
        ("5", "caption b"),
    ]
    assert all(it.pixels.shape == (3, 8, 8) and it.label is None for it in items)
    assert stream.report.skipped_undecodable == 1
    by_caption = {it.caption: it for it in items}
    assert _centre_colour(by_caption["caption 1"].pixels) == COLOURS[1]
    assert "streaming" in stream.description
    assert [it.caption for it in open_captioned(f"hf:{tmp_path}:train", limit=2)] == [it.caption for it in items[:2]]


def test_hf_source_errors(tmp_path, hf_offline, monkeypatch):
    _metadata_folder(tmp_path)
    (tmp_path / "sub" / "metadata.jsonl").unlink()
    with pytest.raises(IslesError, match="no column 'caption'; its columns: image, text, label") as err:
        open_captioned(f"hf:{tmp_path}", caption_column="caption")
    assert "--caption-column" in err.value.hint
    with pytest.raises(IslesError, match="cannot load Hugging Face data set .*split"):
        open_captioned(f"hf:{tmp_path}:nosuchsplit")
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(IslesError, match="datasets") as err:
        open_captioned(f"hf:{tmp_path}")
    assert err.value.hint == "pip install 'isles[real]'"


def test_unknown_source_and_mode(tmp_path):
    with pytest.raises(IslesError, match="unknown captioned data source"):
        open_captioned(str(tmp_path / "missing"))
    with pytest.raises(IslesError, match="mode"):
        open_captioned(str(tmp_path), mode="CMYK")
