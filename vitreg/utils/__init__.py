"""Small helpers shared by every part of vitreg (no dependencies on the rest of the package)."""
