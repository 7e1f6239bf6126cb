"""Stage 02: the sparse autoencoders, their training loop and its statistics, and the SAELens format."""
