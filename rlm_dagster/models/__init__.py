"""The model layer: what each model accepts (``profiles``), what it costs (``prices``), and the
client that calls it (``client``: the ``anthropic`` SDK, retries, deadlines, adaptive
concurrency, the call cache; metering belongs to each run)."""
