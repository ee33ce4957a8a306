"""Where two greedy token lists part, and how close the reference model's choice was there.

Float32 greedy tokens of kvloom and transformers must agree; when they do not, the question is
whether kvloom computed something wrong or the model stood at a near-tie: two tokens whose logits
are a few float32 ulp apart, which any change of summation order (another GEMM kernel, another
batch size) may flip. The reference model answers it: run it over the prompt and the tokens both
agree on, and read its logits for the two tokens at the first position where they part.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

NEAR_TIE_RELATIVE_GAP = 1e-5
"""A gap under this fraction of the logit's magnitude is a near-tie: ~80 float32 ulp (2^-23 each)."""


@dataclass(frozen=True, slots=True)
class Divergence:
    """The first position where ``other``'s tokens leave ``reference``'s, seen by the reference model."""

    request: int
    position: int
    """Index into the generated tokens (0 = the first generated token)."""
    reference_token: int
    other_token: int
    reference_logit: float
    """The reference model's logit for its own token there."""
    other_logit: float
    """The reference model's logit for the other system's token there."""

    @property
    def gap(self) -> float:
        """``reference_logit - other_logit`` (>= 0 when the reference model is greedy)."""
        return self.reference_logit - self.other_logit

    @property
    def near_tie(self) -> bool:
        scale = max(abs(self.reference_logit), abs(self.other_logit), 1.0)
        return abs(self.gap) <= NEAR_TIE_RELATIVE_GAP * scale

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "gap": self.gap, "near_tie": self.near_tie}

    def describe(self) -> str:
        verdict = "a near-tie" if self.near_tie else "NOT a near-tie"
        return (f"request {self.request} parts at generated token {self.position}: the reference's logits for "
                f"its token {self.reference_token} and the other's {self.other_token} are {self.reference_logit:.7g} "
                f"and {self.other_logit:.7g}, {self.gap:.2g} apart ({verdict})")


def first_divergences(model: Any, prompts: list[list[int]], reference: list[list[int]], other: list[list[int]],
                      requests: list[int]) -> list[Divergence]:
    """For each of ``requests`` where the two token lists differ: where they part, with ``model``'s logits
    (a transformers causal LM, the one that produced ``reference``) over ``prompt + reference[:position]``."""
    import torch

    found = []
    for r in requests:
        ref, oth = reference[r], other[r]
        position = next((i for i, (a, b) in enumerate(zip(ref, oth, strict=False)) if a != b), None)
        if position is None:
            continue  # equal where both have tokens (one may be longer): no choice to explain
        ids = torch.tensor([prompts[r] + ref[:position]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, -1].double()
        found.append(Divergence(r, position, ref[position], oth[position], float(logits[ref[position]]),
                                float(logits[oth[position]])))
    return found
