"""kvloom.scheduler."""
