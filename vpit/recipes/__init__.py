"""Training recipes: short, linear scripts built from `vpit.training` components, one per kind of run."""
