"""A/B experiments: assignment, experiment YAML, statistics, analysis, dashboards, ramp control, tuning."""
