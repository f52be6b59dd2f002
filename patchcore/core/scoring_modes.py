"""The named scoring modes, as data: the one place to add a mode (numpy and torch free, so settings can
be validated anywhere). :mod:`patchcore.core.scoring` computes scores by these rules."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ScoringRule:
    """How one scoring mode turns nearest-neighbour distances into scores.

    squared: patch score = mean squared L2 distance to the ``k`` nearest bank rows (else the L2 distance
        to the nearest one); reweight: multiply the image score by eq. 7's factor; default_top_k: the
        image score is the mean of this many largest patch scores (1 = the max) unless set otherwise.
    """

    squared: bool
    reweight: bool
    default_top_k: int
    summary: str


SCORING_RULES: dict[str, ScoringRule] = {
    "mean-top-k": ScoringRule(False, True, 20, "L2; mean of the top-k patch scores x eq. 7 factor (default)"),
    "paper": ScoringRule(False, True, 1, "L2; max patch score x eq. 7 factor (the paper)"),
    "official": ScoringRule(True, False, 1, "squared L2 (mean over k nearest); max patch score (the official code)"),
}
SCORING_MODES = tuple(SCORING_RULES)
DEFAULT_SCORING = "mean-top-k"


def scoring_rule(mode: str) -> ScoringRule:
    """The rule of a named mode; ``ValueError`` naming the known modes otherwise."""
    try:
        return SCORING_RULES[mode]
    except KeyError:
        raise ValueError(f"scoring={mode!r} is not one of {', '.join(SCORING_MODES)}") from None
