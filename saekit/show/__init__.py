"""Stage 05: the concepts shown: the dashboard, plots and steering."""
