"""Names of the statistics computed here: the run format's columns (no torch needed to read).

Example:
    >>> from vanishing.stats.names import ACTIVATION_STATS
    >>> ACTIVATION_STATS[:3]
    ('act_mean', 'act_std', 'act_deriv_mean')
"""

#: Statistics of an activation module's output, in the order they are computed.
ACTIVATION_STATS = (
    "act_mean",
    "act_std",
    "act_deriv_mean",
    "act_saturated",
    "act_dead",
    "act_p02",
    "act_p98",
)
