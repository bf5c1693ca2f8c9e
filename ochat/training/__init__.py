"""Sampler, batching, the padding-free model, the loss and the train entry point."""
