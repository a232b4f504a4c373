"""Ray start-up, worker groups and placement. The only place that creates actors."""
