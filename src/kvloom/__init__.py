"""kvloom: serve LLMs inside your Python application."""
