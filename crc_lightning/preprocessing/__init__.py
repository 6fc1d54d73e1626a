"""Algorithm 1 of Perlo et al. 2024 as small pure functions on arrays (no files, no config)."""
