"""hdccf-triton: the HDCCF debiased contrastive loss for collaborative filtering."""
