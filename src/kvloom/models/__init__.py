"""kvloom.models."""
