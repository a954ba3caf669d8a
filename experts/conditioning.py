"""What an expert is conditioned on besides x_t and t: a class label (a long tensor) or a caption's token embeddings
(`TextCondition`). Both index, move and concatenate the same way, so the sampler and classifier-free guidance treat
them alike. The papers' router sees neither; isles' reads the class, and the caption when a run asks for it
(router/model.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

CONDITIONINGS = ("class", "text", "none")


@dataclass
class TextCondition:
    """Token embeddings [B, L, D] (float) and their attention mask [B, L] (1 = a real token, 0 = padding)."""

    emb: torch.Tensor
    mask: torch.Tensor

    def __len__(self) -> int:
        return self.emb.shape[0]

    def __getitem__(self, rows) -> TextCondition:
        return TextCondition(self.emb[rows], self.mask[rows])

    def to(self, device: torch.device | str) -> TextCondition:
        return TextCondition(self.emb.to(device, torch.float32), self.mask.to(device))

    def cat(self, other: TextCondition) -> TextCondition:
        return TextCondition(torch.cat([self.emb, other.emb]), torch.cat([self.mask, other.mask]))

    def expand(self, n: int) -> TextCondition:
        """A one-row condition (e.g. the empty caption) repeated for n rows."""
        return TextCondition(self.emb[:1].expand(n, -1, -1), self.mask[:1].expand(n, -1))

    @classmethod
    def from_rows(cls, emb: torch.Tensor, mask: torch.Tensor) -> TextCondition:
        """From a shard's stored rows (float16 embeddings, uint8 masks), or one unbatched row ([L, D], [L])."""
        if emb.ndim == 2:
            emb, mask = emb[None], mask[None]
        return cls(emb.float(), mask.float())


def cat_conditions(a, b):
    """Two conditions of one kind stacked along the batch."""
    return a.cat(b) if isinstance(a, TextCondition) else torch.cat([a, b])
