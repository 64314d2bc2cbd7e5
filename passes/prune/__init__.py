"""Structured pruning passes: `prune` (coupled channel removal)."""

from irtool.passes.prune.importance import Importance
from irtool.passes.prune.prune import PruneChannels, PrunePlan, Scope
from irtool.passes.prune.recover import Recover

__all__ = ["Importance", "PruneChannels", "PrunePlan", "Recover", "Scope"]
