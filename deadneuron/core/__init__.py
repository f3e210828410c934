"""The framework-neutral engine: what the torch and Keras backends and the training callbacks share."""
