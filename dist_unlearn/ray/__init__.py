"""Ray Train wiring: the only package module (besides the CLI) that imports Ray."""
