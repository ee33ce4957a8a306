"""kvloom.layers."""
