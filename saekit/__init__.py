"""saekit: train a sparse autoencoder on a language model's activations, prove it worked, and see what
its latents learned. One subpackage (wing) per pipeline stage, over a base they share:

    base < activations (01) < training (02) < evaluation (03) < concepts (04) < show (05)

A module imports only from its own wing and the wings below it (tests/test_wings.py checks this).
`python -m saekit.notebooks` runs the notebook stages headless."""
