"""The experimental design: which components to ablate (target sets, random controls, sweeps)."""
