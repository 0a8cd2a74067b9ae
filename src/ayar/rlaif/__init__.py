"""RLAIF and Constitutional AI: preference data from AI feedback under written principles, then SFT -> DPO."""
