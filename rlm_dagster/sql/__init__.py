"""The data layer: the tables a run binds and where answers go (``tables``: the seams), the
read-only DuckDB snapshot that implements them (``warehouse``), the sqlglot policy every
model-written query passes (``policy``), and the ``output=`` schema answers are cast to
(``output``)."""
