"""One rule per finding kind; each reads a RunView and returns findings with their evidence."""

from vanishing.diagnose.rules import dead, exploding, nonfinite, saturated, stalled, vanishing

RULES = (
    nonfinite.check,
    vanishing.check,
    exploding.check,
    saturated.check,
    dead.check,
    stalled.check,
)
