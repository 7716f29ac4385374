"""The experimental design: which components to ablate (heads, neurons, target sets, random controls, sweeps)."""
