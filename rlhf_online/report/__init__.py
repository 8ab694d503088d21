"""The demo report: held-out judging of policies, statistics, the plot and the written report."""
