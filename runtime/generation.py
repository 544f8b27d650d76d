"""Choosing the next token, in numpy: greedy, temperature, top-k, top-p, repetition penalty, seed.

The conventions are transformers' (so settings mean the same thing in both): the repetition
penalty divides positive and multiplies negative logits of tokens already generated or in the
prompt, then temperature, then top-k, then top-p (smallest set whose probability reaches p).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import numpy as np


@dataclass
class GenerationConfig:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # 1 = off
    seed: Optional[int] = None
    stop: List[str] = field(default_factory=list)  # stop strings, cut from the answer

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0 (0 is greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be > 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class TokenChooser:
    def __init__(self, config: GenerationConfig):
        self.config = config
        self.rng = np.random.default_rng(config.seed)

    def __call__(self, logits: np.ndarray, history: Sequence[int]) -> int:
        """``logits`` (vocab,) of the last position; ``history``: prompt and generated token ids."""
        config = self.config
        logits = logits.astype(np.float64, copy=True)
        if config.repetition_penalty != 1.0 and len(history):
            seen = np.unique(np.asarray([t for t in history if 0 <= t < logits.size], dtype=np.int64))
            values = logits[seen]
            logits[seen] = np.where(values > 0, values / config.repetition_penalty, values * config.repetition_penalty)
        if config.greedy:
            return int(logits.argmax())
        logits /= config.temperature
        if config.top_k and config.top_k < logits.size:
            kth = np.partition(logits, -config.top_k)[-config.top_k]
            logits[logits < kth] = -np.inf
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        if config.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            cumulative = np.cumsum(probs[order])
            # Keep the smallest prefix whose mass reaches top_p (always at least one token).
            keep = order[: int(np.searchsorted(cumulative, config.top_p) + 1)]
            mask = np.zeros_like(probs)
            mask[keep] = probs[keep]
            probs = mask / mask.sum()
        return int(self.rng.choice(probs.size, p=probs))


class StopChecker:
    """Finds stop strings in the decoded answer and says where to cut it."""

    def __init__(self, stop: Sequence[str]):
        self.stop = [s for s in stop if s]

    def cut(self, text: str) -> Optional[int]:
        positions = [text.find(s) for s in self.stop if s in text]
        return min(positions) if positions else None

    def holdback(self, text: str) -> int:
        """How many trailing characters might be the start of a stop string (not streamed yet)."""
        longest = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:n]):
                    longest = max(longest, n)
                    break
        return longest
