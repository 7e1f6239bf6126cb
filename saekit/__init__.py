"""saekit: train a TopK sparse autoencoder on a language model's activations, prove it worked,
and see what its latents learned. One module per concern; the numbered stages call into it."""
