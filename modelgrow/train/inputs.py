"""Synthetic training inputs of the right shapes (benchmarks, tests): latents and text states drawn from a
generator seeded by (seed, sample index), so the stream is identical across runs and resumable."""

from __future__ import annotations

import torch

from ..data.batch import collate


class RandomLatentLoader:
    """Yields latent batches ``{"latent", "y", "mask"[, "y_llm", "llm_mask"], "index"}`` forever; sample i of the
    stream is the same in every run. ``state_dict()``/``load_state_dict()`` give the position (resume without
    repeating); ``rank``/``world_size`` shard the stream."""

    def __init__(self, batch_size: int, latent_shape: tuple[int, int, int, int], caption: tuple[int, int],
                 llm: tuple[int, int] | None = None, seed: int = 0, rank: int = 0, world_size: int = 1,
                 device: str | torch.device = "cpu"):
        self.batch_size, self.latent_shape, self.caption, self.llm = batch_size, latent_shape, caption, llm
        self.seed, self.rank, self.world_size, self.device = seed, rank, world_size, torch.device(device)
        self.position = 0  # batches consumed by this rank

    def _sample(self, index: int) -> dict[str, torch.Tensor]:
        """Sample ``index`` of the stream, a latent sample of the batch schema (:mod:`modelgrow.data.batch`)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        L, C = self.caption
        n = int(torch.randint(1, L + 1, (1,), generator=g))
        out = {"latent": torch.randn(self.latent_shape, generator=g), "y": torch.randn(1, L, C, generator=g),
               "mask": (torch.arange(L) < n).long(), "index": index}
        if self.llm is not None:
            Ll, Cl = self.llm
            m = int(torch.randint(1, Ll + 1, (1,), generator=g))
            out |= {"y_llm": torch.randn(1, Ll, Cl, generator=g), "llm_mask": (torch.arange(Ll) < m).long()}
        return out

    def __iter__(self):
        while True:
            first = (self.position * self.world_size + self.rank) * self.batch_size
            batch = collate([self._sample(first + j) for j in range(self.batch_size)])
            batch = {k: v.to(self.device) if torch.is_tensor(v) and k != "index" else v for k, v in batch.items()}
            self.position += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position, "seed": self.seed, "world_size": self.world_size}

    def load_state_dict(self, sd: dict[str, int]) -> None:
        if sd.get("world_size", self.world_size) != self.world_size:
            raise ValueError("the data position was saved with another world size")
        self.position = int(sd["position"])
