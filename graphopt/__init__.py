"""graphopt."""
