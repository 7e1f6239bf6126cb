"""Stage 01: the model and its layer, the texts, and the activation store, read back as training rows."""
