"""The engine, with no Dagster: the root loop and child runs (``loop``), the run's limits and
metering (``budget``), and what a run reports while it runs (``events``)."""
