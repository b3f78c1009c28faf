"""Layer 2, heads: the modules that change what a torchvision detector computes (branches, the
merge of their detections, masks without labels, teacher boxes). They know torchvision, not
detgraft's model cards, families or strategies (``detgraft.model.families`` names which a family uses)."""
