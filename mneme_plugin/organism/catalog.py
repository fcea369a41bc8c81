"""The organism's interventions by name (no torch import: the CLI's choices come from here)."""

KNOWLEDGE_INTERVENTIONS = ("rmu", "narrow", "benign")
# Edits of behaviour (need the behaviour organism, ``OrganismConfig.behaviours``): identity-shift
# fine-tuning (AOA's shape) and narrow "insecure" fine-tuning (emergent misalignment's shape).
BEHAVIOUR_INTERVENTIONS = ("identity", "insecure")
INTERVENTIONS = KNOWLEDGE_INTERVENTIONS + BEHAVIOUR_INTERVENTIONS
