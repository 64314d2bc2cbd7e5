"""Named pipelines shipped with irtool (entry-point group `irtool.pipelines`)."""

# Cleanup runs to a fixed point in practice: identity removal exposes dead code, folding exposes both.
CLEANUP = "eliminate-identity,fold-constants,dedup-initializers,dce"
