"""kvloom.bench."""
