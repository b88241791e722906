"""Building blocks shared by model definitions."""
