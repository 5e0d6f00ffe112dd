"""The runtime: one job under Ray Train, torchrun or one process (set-up, resume, steps, checkpoints, stops, export)."""
