"""Building blocks shared by every architecture: norms, rotary, linear, attention."""
