"""The organism's interventions by name (no torch import: the CLI's choices come from here)."""

INTERVENTIONS = ("rmu", "narrow", "benign")
