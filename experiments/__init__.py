"""A/B experiments: assignment, analysis, dashboards, and the simulated feed world."""
