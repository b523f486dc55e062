"""A grid of runs: plan it (plan), run it once per run across workers (execute, locks, launch),
watch it (status), resume it from an archive (archived), search it (tune)."""
