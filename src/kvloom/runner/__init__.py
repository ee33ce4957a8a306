"""kvloom.runner."""
