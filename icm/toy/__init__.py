"""The toy world: synthetic shapes with planted biases, its oracle and feature extractor,
and the toy diffusion model."""
