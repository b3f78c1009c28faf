"""Layer 3, model: a detector and what detgraft knows of it: its family's description, its card,
widening (surgery), builders, loading and checkpoints."""
