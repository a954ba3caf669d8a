"""Text encoder: MiniLM from its PyPI package (offline), a tiny CLIP text model saved to a folder (both the Hub's full
CLIP layout and a text-only one), the spec round trip, and one-line errors; the Hub is faked, never contacted."""

from __future__ import annotations

import json
import string

import pytest
import torch

from isles.protocol.errors import IslesError
from isles.router.pretrained import resolve_source
from isles.router.text_encoder import (
    DEFAULT_TEXT_ENCODER,
    OFFLINE_TEXT_ENCODER,
    TextEncoderSpec,
    load_text_encoder,
)

CAPTIONS = ["a red bird on a branch", "a blue car in the rain", "a red bird on a branch, at dusk"]
TINY_CLIP_TEXT = dict(
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    vocab_size=1000,
    max_position_embeddings=77,
)


@pytest.fixture(scope="module")
def minilm():
    return load_text_encoder(OFFLINE_TEXT_ENCODER, device="cpu")


def tiny_clip_tokenizer():
    """A CLIP BPE tokenizer over single characters (no merges): CLIP's pre-tokenizer, specials and padding."""
    from transformers import CLIPTokenizerFast

    vocab: dict[str, int] = {}
    for suffix in ("", "</w>"):
        for c in string.ascii_lowercase + string.digits + string.punctuation:
            vocab[c + suffix] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizerFast(vocab=vocab, merges=[])


def save_tiny_clip(folder, full: bool):
    """The Hub's layout for openai/clip-*: a whole CLIPModel (text and vision); or the text half alone."""
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    tokenizer = tiny_clip_tokenizer()
    specials = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    text = dict(TINY_CLIP_TEXT, pad_token_id=tokenizer.pad_token_id, **specials)
    if full:
        vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4, image_size=32)
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=dict(vision, patch_size=16), projection_dim=16))
    else:
        model = CLIPTextModel(CLIPTextConfig(**text))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model.text_model if full else model


def test_minilm_embeds_captions_deterministically(minilm):
    assert minilm.spec == TextEncoderSpec(id="minilm", revision=None, width=384, max_length=77)
    states, mask = minilm(CAPTIONS)
    assert states.shape == (3, 77, 384) and states.dtype == torch.float16 and torch.isfinite(states).all()
    assert mask.shape == (3, 77) and mask.dtype == torch.bool
    again, again_mask = minilm(CAPTIONS)
    assert torch.equal(states, again) and torch.equal(mask, again_mask)
    for i in range(3):
        for j in range(i + 1, 3):
            assert (states[i].float() - states[j].float()).abs().max() > 0.1
    # One caption alone or in a batch: the same embedding (every caption is padded to max_length).
    alone, _ = minilm(CAPTIONS[1:2])
    torch.testing.assert_close(alone[0].float(), states[1].float(), atol=2e-3, rtol=0)


def test_minilm_mask_marks_the_real_tokens(minilm):
    _, mask = minilm(CAPTIONS)
    for caption, row in zip(CAPTIONS, mask, strict=True):
        n = len(minilm.tokenizer(caption)["input_ids"])  # [CLS] ... [SEP]
        assert row[:n].all() and not row[n:].any()
    long_states, long_mask = minilm(["word " * 200])  # truncated to max_length, every token real
    assert long_states.shape == (1, 77, 384) and long_mask.all()
    empty_states, empty_mask = minilm([])
    assert empty_states.shape == (0, 77, 384) and empty_mask.shape == (0, 77)


def test_null_is_the_empty_caption(minilm):
    null_states, null_mask = minilm.null()
    states, mask = minilm([""])
    assert null_states.shape == (77, 384) and null_mask.shape == (77,)
    assert torch.equal(null_states, states[0]) and torch.equal(null_mask, mask[0])
    assert null_mask.sum() == 2  # [CLS] [SEP]
    caption, _ = minilm(CAPTIONS[:1])
    assert not torch.allclose(null_states[:2].float(), caption[0, :2].float(), atol=1e-2)
    null_states.zero_()  # callers get copies: the cached null condition cannot be spoiled
    assert minilm.null()[0].abs().sum() > 0


def test_spec_round_trips_and_reloads_the_same_encoder(minilm, tmp_path):
    record = json.loads(json.dumps({**minilm.spec.to_dict(), "written_by": "a newer isles"}))
    spec = TextEncoderSpec.from_dict(record)  # unknown fields are ignored
    assert spec == minilm.spec
    with pytest.raises(IslesError, match="bad text encoder record"):
        TextEncoderSpec.from_dict({"id": "minilm"})
    again = load_text_encoder(spec.id, max_length=spec.max_length, revision=spec.revision, device="cpu")
    assert again.spec == spec and torch.equal(again(CAPTIONS)[0], minilm(CAPTIONS)[0])
    short = load_text_encoder(spec.id, max_length=8, device="cpu")
    assert short.spec.max_length == 8 and short(CAPTIONS)[0].shape == (3, 8, 384)


@pytest.mark.parametrize("full", [True, False], ids=["clip-model", "clip-text-model"])
def test_a_clip_checkpoint_loads_its_text_half(tmp_path, full):
    from transformers import CLIPTextModel

    folder = tmp_path / "clip"
    reference = save_tiny_clip(folder, full=full).eval()
    encoder = load_text_encoder(str(folder), device="cpu")
    assert isinstance(encoder.model, CLIPTextModel) and encoder.is_clip
    assert encoder.spec == TextEncoderSpec(id=str(folder), revision=None, width=32, max_length=77)
    captions = [f"caption number {i}: a {c} shape" for i, c in enumerate(["red", "green", "blue"] * 45)]
    states, mask = encoder(captions)  # 135 captions: three internal batches
    assert states.shape == (135, 77, 32) and mask.shape == (135, 77)
    tokens = encoder.tokenizer(captions[:5], padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        expected = reference(input_ids=tokens["input_ids"]).last_hidden_state  # the saved weights, unmasked
    torch.testing.assert_close(states[:5].float(), expected, atol=2e-3, rtol=2e-3)
    assert torch.equal(mask[:5], tokens["attention_mask"].bool())
    assert mask[0, 0] and not mask[0, -1]  # <|startoftext|> first, padding last
    with pytest.raises(IslesError, match="max_length 78 is out of range"):
        load_text_encoder(str(folder), max_length=78, device="cpu")


def test_missing_or_unusable_encoders_are_one_line_errors(tmp_path):
    with pytest.raises(IslesError, match="no text encoder folder") as info:
        load_text_encoder(str(tmp_path / "missing"), device="cpu")
    assert "minilm" in info.value.hint
    (tmp_path / "empty").mkdir()
    with pytest.raises(IslesError, match="cannot load the text encoder") as info:
        load_text_encoder(str(tmp_path / "empty"), device="cpu")
    assert "\n" not in str(info.value)
    # Pickled weights are refused: only safetensors load.
    pickled = tmp_path / "pickled"
    model = save_tiny_clip(pickled, full=False)
    (pickled / "model.safetensors").unlink()
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(IslesError, match="cannot load the text encoder"):
        load_text_encoder(str(pickled), device="cpu")


def _hub_error(cls):
    """A huggingface_hub error without an HTTP response (its constructor wants one; raising needs none)."""
    error = cls.__new__(cls)
    Exception.__init__(error, "404 from a fake Hub")
    return error


def test_hub_ids_are_pinned_and_failures_explained(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
    from huggingface_hub.hf_api import ModelInfo

    asked = []

    def fake_model_info(repo_id, revision=None, timeout=None):
        asked.append((repo_id, revision))
        if repo_id == "isles-tests/gated":
            raise _hub_error(GatedRepoError)
        if repo_id.startswith("isles-tests/unreachable"):
            raise ConnectionError("no route to host")
        if repo_id != "isles-tests/present":
            raise _hub_error(RepositoryNotFoundError)
        return ModelInfo(id=repo_id, sha="a" * 40, siblings=[{"rfilename": "config.json"}])

    monkeypatch.setattr(huggingface_hub, "model_info", fake_model_info)
    source = resolve_source("hf:isles-tests/present", "main", "text encoder", hint="use minilm")
    assert (source.path, source.hub, source.revision, source.offline) == ("isles-tests/present", True, "a" * 40, False)
    assert source.spec_id == "hf:isles-tests/present" and source.has_file("config.json")
    assert not source.has_file("vae/config.json")
    with pytest.raises(IslesError, match="no text encoder 'openai/clip-vit-large-patch14' on the Hub"):
        load_text_encoder("clip", device="cpu")  # the alias; the fake Hub does not know it
    assert asked[-1] == (DEFAULT_TEXT_ENCODER, None)
    with pytest.raises(IslesError, match="is gated"):
        load_text_encoder("hf:isles-tests/gated", device="cpu")
    # Unreachable Hub: load from the cache only, which does not hold it; no second network attempt.
    with pytest.raises(IslesError, match="cannot reach the Hub") as info:
        load_text_encoder("isles-tests/unreachable-encoder-7c1e", device="cpu")
    assert "minilm" in info.value.hint and "\n" not in str(info.value)
    with pytest.raises(IslesError, match="no text encoder folder"):
        load_text_encoder("/no/such/folder", device="cpu")
