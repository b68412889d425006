"""Models, tasks and training loops that reproduce the vanishing gradient problem and its cures."""
