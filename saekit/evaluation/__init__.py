"""Stage 03: the SAE judged on held-out data: splice, verdict, sparse probing."""
