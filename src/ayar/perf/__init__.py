"""Performance: `ayar bench` (ayar against the plain alternative, same run) and the memory planner."""
