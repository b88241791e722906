"""Speculative decoding: cheap guesses for the next tokens, verified by one forward pass of the model."""
