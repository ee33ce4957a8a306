"""kvloom.engine."""
