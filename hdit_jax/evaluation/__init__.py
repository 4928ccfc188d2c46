"""Sample quality: Inception-v3 features, FID / KID / precision-recall, the digit metric."""
