"""The Dagster adapter: the resource (``resource``, also ``rlm.run`` / ``rlm.llm_where`` for
your own asset bodies), the asset factory (``assets``), its one argument model
(``definition``), the translator (``translator``), the YAML component (``component``) and
run metadata (``metadata``). Nothing here holds RLM logic."""
