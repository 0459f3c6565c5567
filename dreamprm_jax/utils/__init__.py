"""Small helpers shared across the library (one concept per module)."""
